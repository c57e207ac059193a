"""``fastvae export``: write a run's decoder as a validated ONNX file (plus fp16/int8 copies)."""

from __future__ import annotations

import argparse
import sys

from fastvae.commands import arg_types

HELP = "export a run's decoder to ONNX, validate it (onnx.checker + onnxruntime vs torch)"
DESCRIPTION = (
    "Write the decoder of a trained run as one self-contained ONNX file (input z: (batch, "
    "latent_dim), or (batch, c, height, width) for spatial latents; outputs 'mean' and 'params'), check it with onnx.checker and compare "
    "onnxruntime with torch on fresh batch sizes; print the report. Nothing is written (and an "
    "existing file is kept) when validation fails. Sample from it with 'fastvae sample'."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (or .ckpt file) written by 'fastvae train'")
    parser.add_argument(
        "--out", type=arg_types.path, help="ONNX file to write; None: RUN/decoder.onnx, or the .ckpt path with .onnx"
    )
    parser.add_argument("--fp16", action="store_true", help="also write <out stem>.fp16.onnx (weights in half the bytes: about half the file for "
                        "large models, less saved for small ones whose graph weighs more)")
    parser.add_argument("--int8", action="store_true", help="also write <out stem>.int8.onnx (dynamic int8 quantization)")
    parser.add_argument("--opset", type=int, help="ONNX opset; None: the exporter's own (below 18 uses the TorchScript exporter)")
    parser.add_argument("--triton-repo", metavar="DIR", help="also write a Triton Inference Server model repository: DIR/NAME/config.pbtxt and DIR/NAME/1/model.onnx")
    parser.add_argument("--name", help="model name in the Triton repository (default fastvae_decoder)")
    parser.add_argument("--max-batch", type=int, help="the Triton model's max_batch_size (dynamic batching; 1 to 2147483647, default 64)")
    parser.add_argument(
        "--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
        help="torch.onnx exporter: auto tries the torch.export-based one, then TorchScript "
             "(spatial-latent decoders: TorchScript directly)",
    )
    parser.add_argument("--encoder", action="store_true",
                        help="also export the encoder of a spatial-latent run (--model convkl): images -> "
                        "(mu, logvar), into --encoder-out, validated against torch at two image sizes")
    parser.add_argument("--encoder-out", help="encoder file; None: encoder.onnx beside --out (or <stem>.encoder.onnx)")


def run(args: argparse.Namespace) -> int:
    import contextlib
    import dataclasses
    from pathlib import Path

    from fastvae.errors import FastVAEError
    from fastvae.export import export_decoder
    from fastvae.run_folder import move_into_place, temporary_folder

    out = args.out
    if out is None:
        source = Path(args.run)
        out = source / "decoder.onnx" if source.is_dir() else source.with_suffix(".onnx")
    for flag, value, needs in (("--name", args.name, "--triton-repo"), ("--max-batch", args.max_batch, "--triton-repo"),
                               ("--encoder-out", args.encoder_out, "--encoder")):
        if value is not None and not (args.encoder if needs == "--encoder" else args.triton_repo is not None):
            raise FastVAEError(f"{flag} goes with {needs}: add {needs}, or drop {flag}")
    name = "fastvae_decoder" if args.name is None else args.name
    max_batch = 64 if args.max_batch is None else args.max_batch
    if args.triton_repo is not None:  # checked before the export's work
        from fastvae.export.triton_repo import check_repository_target

        for model_name, _ in _triton_models(name, args):
            check_repository_target(args.triton_repo, model_name, max_batch, as_flags=True)
    with contextlib.ExitStack() as stack:
        if args.encoder:  # before the decoder (a run without a spatial encoder fails before any
            # work), staged: moved into place only once the decoder is written too
            from fastvae.export.encoder_export import encoder_path, export_encoder

            encoder_out = Path(args.encoder_out or encoder_path(out))
            _check_encoder_out(encoder_out, Path(out))
            staged = stack.enter_context(temporary_folder(encoder_out)) / encoder_out.name
            try:
                encoder_report = export_encoder(args.run, staged, opset=args.opset, exporter=args.exporter)
            except FastVAEError as exc:  # named by where it goes, not by the staging folder
                raise FastVAEError(str(exc).replace(str(staged), str(encoder_out))) from None
        report = export_decoder(args.run, out, opset=args.opset, fp16=args.fp16, int8=args.int8,
                                exporter=args.exporter)
        if args.encoder:
            move_into_place(staged, encoder_out)
            encoder_report = dataclasses.replace(encoder_report, path=encoder_out)
    print(report.summary())
    from fastvae.checkpoint import unfinished

    where = unfinished(args.run)
    if where is not None:
        print(f"note: {args.run} is an unfinished run (its checkpoint: {where}): the export is that state; "
              "'fastvae train --resume' finishes it, then export again", file=sys.stderr)
    _note_older_siblings(args, Path(out))
    from fastvae.run_folder import note_staged_leftovers

    for path in [Path(out), *([encoder_out] if args.encoder else [])]:
        note_staged_leftovers(path, "export")
    if args.encoder:
        print(encoder_report.summary())
    if args.triton_repo is not None:
        from fastvae.export.triton_repo import write_triton_repository

        from fastvae.export import variant_path

        for model_name, precision in _triton_models(name, args):
            path = report.path if precision == "fp32" else variant_path(report.path, precision)
            print(write_triton_repository(path, args.triton_repo, name=model_name, max_batch=max_batch).summary())
    return 0


def _triton_models(name: str, args) -> list[tuple[str, str]]:
    """(model name, precision) of the Triton models an export writes: NAME (the fp32 decoder),
    then NAME_fp16 and NAME_int8 with ``--fp16`` / ``--int8`` (each variant a model of its own;
    their inputs and outputs are float32 too)."""
    return [(name, "fp32")] + [(f"{name}_{p}", p) for p, on in (("fp16", args.fp16), ("int8", args.int8)) if on]


def _check_encoder_out(path, decoder_out) -> None:
    """An .onnx file of its own: never a checkpoint, a folder or one of the decoder's files."""
    from pathlib import Path

    from fastvae.errors import FastVAEError
    from fastvae.export import variant_path

    if path.suffix.lower() != ".onnx":
        raise FastVAEError(f"--encoder-out must end in .onnx, got {path.name!r}")
    if path.is_dir():
        raise FastVAEError(f"--encoder-out {path} is a folder: give a file name such as {path / 'encoder.onnx'}")
    decoder_files = {decoder_out, variant_path(decoder_out, "fp16"), variant_path(decoder_out, "int8")}
    if path.resolve() in {Path(p).resolve() for p in decoder_files}:
        raise FastVAEError(f"--encoder-out {path} is where the decoder goes: give the encoder another name")


def _note_older_siblings(args, out) -> None:
    """One note naming the fp16/int8 variants and the encoder beside ``out`` that this export did
    not write and that are older than the run's checkpoint: they hold an earlier model (a
    'fastvae sample' of decoder.int8.onnx would draw from it, beside a new decoder.onnx)."""
    from pathlib import Path

    from fastvae.checkpoint import checkpoint_path
    from fastvae.export import variant_path
    from fastvae.export.encoder_export import encoder_path

    saved = checkpoint_path(args.run).stat().st_mtime
    written = {Path(args.encoder_out or encoder_path(out)).resolve()} if args.encoder else set()
    siblings = [(variant_path(out, "fp16"), "--fp16", args.fp16), (variant_path(out, "int8"), "--int8", args.int8),
                (encoder_path(out), "--encoder", False)]
    older = [(path, flag) for path, flag, on in siblings
             if not on and path.resolve() not in written and path.is_file() and path.stat().st_mtime < saved]
    if older:
        print(f"note: {', '.join(str(path) for path, _ in older)} beside {out} "
              f"{'is' if len(older) == 1 else 'are'} older than {checkpoint_path(args.run)} (an earlier model): "
              f"export again with {' '.join(flag for _, flag in older)} to replace "
              f"{'it' if len(older) == 1 else 'them'}, or delete {'it' if len(older) == 1 else 'them'}",
              file=sys.stderr)
