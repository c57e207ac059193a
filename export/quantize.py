"""Smaller decoder files: fp16 (half-precision weights and arithmetic) and int8 (dynamic
quantization of the matrix products). Both keep float32 inputs and outputs, so the sampler uses
them exactly like the fp32 file. Their error against fp32 is measured by ``export_decoder``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from fastvae.errors import FastVAEError, one_line


# Ops kept in fp32 in the fp16 copy of a spatial decoder: normalizations and softmax sum over a
# whole feature map or row, and those sums (and squares) overflow fp16's 65504.
FP32_OPS = ("GroupNormalization", "InstanceNormalization", "LayerNormalization", "Softmax",
            "ReduceMean", "ReduceSum", "ReduceSumSquare", "Pow", "Sqrt", "Reciprocal")


def to_fp16(model, fp32_ops=()):
    """An fp16 copy of an fp32 ``onnx.ModelProto``, with float32 graph inputs and outputs;
    nodes of the types ``fp32_ops`` (besides the converter's own list) stay fp32.

    Uses ``onnxconverter_common.float16`` when installed, otherwise the copy of the same
    converter that ships with onnxruntime (``onnxruntime.transformers.float16``).
    """
    import onnx

    try:
        from onnxconverter_common.float16 import convert_float_to_float16
    except ImportError:
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError as exc:
            raise FastVAEError(
                "fp16 export needs onnxconverter-common or onnxruntime's transformers tools "
                f"({exc}); pip install onnxconverter-common, or export without --fp16"
            ) from None
    source = onnx.ModelProto()
    source.CopyFrom(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values out of fp16 range were clipped": measured later
        block = None
        if fp32_ops:  # added to the converter's own list (ops it cannot run in fp16)
            import importlib

            own = getattr(importlib.import_module(convert_float_to_float16.__module__), "DEFAULT_OP_BLOCK_LIST", [])
            block = sorted(set(own) | set(fp32_ops))
        half = convert_float_to_float16(source, keep_io_types=True, op_block_list=block,
                                        node_block_list=logit_path(source.graph) or None)
    _skip_round_trips(half.graph)
    topological_sort(half.graph)  # the converter appends its input Casts at the end
    return half


def _skip_round_trips(graph) -> None:
    """fp32 nodes that read a float32 value through Cast(fp16) then Cast(fp32) - a graph input
    (cast to fp16 once for the fp16 nodes) or another fp32 node's output - read the value
    itself: the round trip kept 11 bits (of the latent, of the skip path's pixels). Values of
    other types (an integer cast to float) and of unknown type are left as they are; the unused
    back-casts are dropped."""
    import onnx

    def to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None)

    fp32 = {v.name for v in (*graph.input, *graph.value_info, *graph.output)
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    producer = {out: node for node in graph.node for out in node.output}
    direct = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if (to(node) == onnx.TensorProto.FLOAT and first is not None and first.op_type == "Cast"
                and to(first) == onnx.TensorProto.FLOAT16 and first.input[0] in fp32):
            direct[node.output[0]] = first.input[0]
    if not direct:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in direct:
                node.input[i] = direct[name]
    graph_outputs = {o.name for o in graph.output}
    kept = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in direct
                                          and n.output[0] not in graph_outputs)]
    del graph.node[:]
    graph.node.extend(kept)


def logit_path(graph) -> list[str]:
    """Names of the nodes a ``Log`` depends on, the Log too (named here where unnamed): a
    probability's logit, log(p / (1 - p)) of p clamped to [1e-3, 1 - 1e-3] (a spatial decoder's
    Bernoulli skip path), stays fp32 - fp16 steps by 4.9e-4 near 1, so 1 - p and its logit were
    off by up to ~0.2 on a trained decoder - and the cheap per-pixel nodes before it (the 1x1 map, the upsampling)
    with it. A decoder without a Log: none."""
    producer = {out: node for node in graph.node for out in node.output}
    todo = [node for node in graph.node if node.op_type == "Log"]
    seen: dict[int, object] = {}
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        todo += [producer[name] for name in node.input if name in producer]
    names = []
    for i, node in enumerate(seen.values()):
        if not node.name:
            node.name = f"fastvae_logit_path_{i}"
        names.append(node.name)
    return names


INT8_OPS = ("MatMul", "Gemm")  # what to_int8 quantizes


def weight_products(graph) -> int:
    """The MatMul/Gemm nodes of ``graph`` with a constant (weight) operand: what dynamic
    quantization turns into int8. A product of two activations (attention's q k^T and its
    weights times v) stays fp32."""
    constants = {t.name for t in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    return sum(1 for node in graph.node
               if node.op_type in INT8_OPS and any(name in constants for name in node.input[:2]))


def to_int8(src: Path, dst: Path, *, large: bool = False) -> None:
    """Dynamic int8 quantization of ``src``: int8 weights per output channel, uint8 activations
    quantized per batch.

    ``reduce_range`` (7-bit weights) keeps it accurate on x86 CPUs without VNNI, where uint8 x
    int8 products can saturate 16-bit intermediates: without it a digits decoder's logits were
    off by up to 2.4 on an AVX2 CPU, with it by 0.07 (means: 0.01). The file may run on another
    machine than the one that wrote it, so the portable setting is the default.
    Only MatMul/Gemm are quantized: onnxruntime's dynamically quantized Conv (ConvInteger) ran
    5x slower than the fp32 Conv on an AVX2 CPU, so convolutions stay fp32.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # pragma: no cover - ships with onnxruntime
        raise FastVAEError(f"int8 export needs onnxruntime.quantization ({exc}); export without --int8") from None
    try:
        with _quiet():
            quantize_dynamic(
                str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                use_external_data_format=large, op_types_to_quantize=list(INT8_OPS),
            )
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors have no common type
        # the quantizer writes copies of the model beside src (onnx shape inference) and in
        # $TMPDIR; on a full disk onnx truncates its copy silently and parsing it fails
        # (DecodeError, ValueError): the folder short of room is named when one is
        from fastvae.export.onnx_export import _files_of  # the graph and its external data

        need, tmp = 2 * sum(f.stat().st_size for f in _files_of(src)), Path(tempfile.gettempdir())
        tmp_short = os.stat(tmp).st_dev != os.stat(src.parent).st_dev and shutil.disk_usage(tmp).free < need
        if _under(exc, tmp) or (tmp_short and getattr(exc, "filename", None) is None):
            raise FastVAEError(f"int8 export: onnxruntime's quantizer writes a copy of the model to {tmp} "
                               "($TMPDIR), which has no room for it: free space there or set TMPDIR to a "
                               "folder on another disk") from None
        if isinstance(exc, OSError):
            raise
        if shutil.disk_usage(src.parent).free < need:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst)) from None
        raise FastVAEError(f"onnxruntime's int8 quantization failed ({one_line(exc)}); export without "
                           "--int8") from None


def _under(exc: BaseException, folder: Path) -> bool:
    name = getattr(exc, "filename", None)
    return name is not None and Path(str(name)).resolve().is_relative_to(folder.resolve())


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs."""
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # outer-scope names of subgraphs, or a cycle: keep order
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


@contextlib.contextmanager
def _quiet():
    """Silence onnxruntime.quantization's logging advice ("consider pre-processing") and
    warnings for the duration of the call."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
