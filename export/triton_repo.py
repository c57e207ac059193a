"""A Triton Inference Server model repository for an exported fastvae decoder.

``write_triton_repository(decoder.onnx, DIR, name="fastvae_decoder", max_batch=64)`` writes::

    DIR/NAME/config.pbtxt      platform onnxruntime_onnx, max_batch_size, dynamic_batching,
                               inputs/outputs with the graph's names, types and (per-example)
                               dims, the decoder's metadata as string parameters
    DIR/NAME/1/model.onnx      the decoder (and its external-data file, if it has one)

Triton's ``max_batch_size`` > 0 means the batch dimension is implicit, so ``dims`` are the
graph's dims without the first (symbolic) one; it is an int32 in Triton's schema, so at most
2**31 - 1. Other version folders already in ``DIR/NAME`` are left alone (they are the user's),
but named in a note: Triton serves the highest version by default, so a ``DIR/NAME/2`` would
shadow this export's ``1``. Every file is written and fsynced in a staging folder inside
``DIR/NAME`` (permissions from the umask) before any is renamed into place, the config last: a
failed write (full disk) replaces nothing, and Triton polling the repository never reads half a
file. Needs onnx (no torch, no tritonclient).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fastvae import run_folder
from fastvae.errors import FastVAEError, one_line, write_failure
from fastvae.export import metadata as md

PLATFORM = "onnxruntime_onnx"
DEFAULT_NAME = "fastvae_decoder"
DEFAULT_MAX_BATCH = 64
DEFAULT_QUEUE_DELAY_US = 2000
MAX_QUEUE_DELAY_US = 60_000_000  # a minute, like serve's --max-wait-ms ceiling
VERSION = "1"
MODEL_FILE = "model.onnx"
MAX_BATCH_LIMIT = 2**31 - 1  # ModelConfig.max_batch_size is an int32: Triton cannot parse more
# ONNX TensorProto element type -> Triton DataType
_TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16", 2: "TYPE_UINT8",
                 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class TritonRepository:
    """What ``write_triton_repository`` wrote."""

    config: Path
    model: Path
    name: str
    max_batch: int
    newer_versions: tuple[str, ...] = ()  # version folders above VERSION already in DIR/NAME

    def summary(self) -> str:
        """One line; a second (a note) when other version folders would be served instead."""
        text = (f"wrote Triton model '{self.name}' (platform {PLATFORM}, max_batch_size {self.max_batch}, "
                f"dynamic batching): {self.config} and {self.model}")
        if self.newer_versions:
            many = len(self.newer_versions) > 1
            text += (f"\nnote: {self.config.parent} also holds version folder{'s' if many else ''} "
                     f"{', '.join(self.newer_versions)}: Triton serves the highest version, not this export's "
                     f"{VERSION}; move {'them' if many else 'it'} away to serve this one")
        return text


def check_repository_target(repo: str | os.PathLike, name: str, max_batch: int, *, as_flags: bool = False) -> None:
    """FastVAEError (one line) for a model name, batch size or repository path that cannot
    work: checked before anything is written (``fastvae export`` calls it before exporting,
    ``as_flags``: its messages name the command's flags, else the function's keywords)."""
    said = {"name": "--name", "max_batch": "--max-batch", "repo": "--triton-repo"} if as_flags else \
        {"name": "name", "max_batch": "max_batch", "repo": "repo"}
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise FastVAEError(f"{said['name']} must be letters, digits, '_', '-' or '.' (not '.' or '..'), got {name!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise FastVAEError(f"{said['max_batch']} must be an integer from 1 to {MAX_BATCH_LIMIT} (Triton's int32 "
                           f"max_batch_size), got {max_batch!r}")
    for path, what in ((Path(repo), "the repository"), (Path(repo) / name, "the model's folder"),
                       (Path(repo) / name / VERSION, "the version folder")):
        if path.exists() and not path.is_dir():  # found after the export had replaced the decoder
            raise FastVAEError(f"{said['repo']} {repo}: {path} is a file where {what} goes: move it away, "
                               "or give another folder (it is created if missing)")
    # where the model folder would be created: tried now, so a repository that cannot be written
    # fails before the export replaces the decoder file
    failure = run_folder.write_failure_in(Path(repo) / name)
    if failure is not None:
        raise FastVAEError(f"{said['repo']} {repo} cannot be written ({write_failure(failure)}): "
                           "give a folder you can write to")


def write_triton_repository(onnx_path, repo: str | os.PathLike, *, name: str = DEFAULT_NAME,
                            max_batch: int = DEFAULT_MAX_BATCH,
                            max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> TritonRepository:
    """Write ``repo/name/config.pbtxt`` and ``repo/name/1/model.onnx`` for the fastvae decoder
    ``onnx_path``; FastVAEError (one line) for a bad name, batch size or file."""
    check_repository_target(repo, name, max_batch)
    if (not isinstance(max_queue_delay_us, int) or isinstance(max_queue_delay_us, bool)
            or not 0 <= max_queue_delay_us <= MAX_QUEUE_DELAY_US):  # Triton refuses the model otherwise
        raise FastVAEError(f"max_queue_delay_us must be an integer from 0 to {MAX_QUEUE_DELAY_US}, "
                           f"got {max_queue_delay_us!r}")
    source = Path(onnx_path)
    text = config_text(source, name, max_batch, max_queue_delay_us)
    folder = Path(repo) / name
    from fastvae.export.onnx_export import _files_of

    version_dir = folder / VERSION
    config = folder / "config.pbtxt"
    created = not folder.exists()
    try:
        # every file is written and fsynced in a staging folder before the first rename, so a
        # full disk or a failed copy replaces nothing (a new model beside the old config would
        # not load, or load with the old tensor names); then the graph's external data, the
        # graph, and the config last: renames, which need no space
        with run_folder.temporary_folder(config) as staging:
            (staging / VERSION).mkdir()
            moves = []
            for src in _files_of(source):  # external data first, the graph last
                target = version_dir / (MODEL_FILE if src == source else src.name)
                moves.append((Path(shutil.copyfile(src, staging / VERSION / src.name)), target))
            (staging / config.name).write_text(text)
            moves.append((staging / config.name, config))
            version_dir.mkdir(exist_ok=True)
            run_folder.move_all_into_place(moves)
    except OSError as exc:
        if created:  # a model folder without its config would stop Triton loading the repository
            shutil.rmtree(folder, ignore_errors=True)
        raise FastVAEError(f"could not write the Triton repository {folder} ({write_failure(exc)})") from None
    return TritonRepository(config, version_dir / MODEL_FILE, name, max_batch, _newer_versions(folder))


def _newer_versions(folder: Path) -> tuple[str, ...]:
    """The version folders of ``folder`` numbered above VERSION, lowest first: Triton's default
    version policy (latest 1) serves the highest one."""
    try:
        names = [p.name for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]
    except OSError:
        return ()
    return tuple(sorted((n for n in names if int(n) > int(VERSION)), key=int))


def config_text(onnx_path: Path, name: str, max_batch: int, max_queue_delay_us: int) -> str:
    """The ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``) for the decoder."""
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - missing, truncated, not ONNX: one line
        raise FastVAEError(f"{onnx_path} could not be read as ONNX ({one_line(exc)}); export it again") from None
    metadata = {p.key: p.value for p in proto.metadata_props}
    if metadata.get("fastvae_format") == "fastvae-encoder":
        raise FastVAEError(f"{onnx_path} is a fastvae encoder: a Triton repository here serves a decoder "
                           "(decoder.onnx from 'fastvae export RUN')")
    if metadata.get("fastvae_format") != md.FORMAT:
        raise FastVAEError(f"{onnx_path} is not a fastvae decoder: write one with 'fastvae export RUN'")
    metadata = md.client_metadata(metadata)  # the source's run folder name, not the exporting machine's path
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    lines = [f"name: {_quote(name)}", f"platform: {_quote(PLATFORM)}", f"max_batch_size: {max_batch}"]
    for kind, values in (("input", inputs), ("output", proto.graph.output)):
        entries = [_tensor_entry(v, onnx_path) for v in values]
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}")
    for key in sorted(metadata):
        lines.append(f"parameters {{\n  key: {_quote(key)}\n  value {{ string_value: {_quote(metadata[key])} }}\n}}")
    return "\n".join(lines) + "\n"


def _tensor_entry(value_info, onnx_path: Path) -> str:
    tensor = value_info.type.tensor_type
    dims = list(tensor.shape.dim)
    if not dims or dims[0].HasField("dim_value"):
        raise FastVAEError(
            f"{onnx_path}: '{value_info.name}' has no symbolic batch dimension, which Triton's dynamic "
            "batching needs; export it again with 'fastvae export'"
        )
    rest = []
    for dim in dims[1:]:
        rest.append(str(dim.dim_value) if dim.HasField("dim_value") else "-1")
    data_type = _TRITON_TYPES.get(tensor.elem_type)
    if data_type is None:
        raise FastVAEError(f"{onnx_path}: '{value_info.name}' has an element type Triton's ONNX backend lacks")
    return (f"  {{\n    name: {_quote(value_info.name)}\n    data_type: {data_type}\n"
            f"    dims: [ {', '.join(rest)} ]\n  }}")


def _quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept, quotes, backslashes and controls escaped)."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


