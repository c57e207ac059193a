"""The flags every command that runs an exported decoder takes: the model file, onnxruntime
threads and execution provider (not a command: no HELP)."""

from __future__ import annotations

import argparse

from fastvae.commands import arg_types

PROVIDER_HELP = "onnxruntime execution provider: cpu, cuda, tensorrt, openvino or coreml"


def add_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="decoder .onnx file written by 'fastvae export'")
    parser.add_argument("--threads", type=arg_types.onnx_threads, help="onnxruntime intra-op threads; None: by batch size (measured rule)")
    parser.add_argument("--provider", default="cpu", help=PROVIDER_HELP)
