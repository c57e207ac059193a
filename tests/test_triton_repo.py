"""``fastvae export --triton-repo``: config.pbtxt parsed with Triton's own model-config schema
(tritonclient) and checked against the ONNX graph; the model file; atomic writes; errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from fastvae.errors import FastVAEError
from fastvae.export.triton_repo import write_triton_repository
from testkit import exported_mlp_decoder

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402 - after the skip

LATENT = 5
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return exported_mlp_decoder(tmp_path_factory.mktemp("triton"), hidden_dim=16, latent_dim=LATENT,
                                likelihood="gaussian", sigma=0.3)[1]


def parse(path) -> "model_config_pb2.ModelConfig":
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def _graph_tensors(proto, values):
    """{name: (Triton data type name, dims without the batch dim)} read from the ONNX graph."""
    onnx_to_triton = {onnx.TensorProto.FLOAT: "TYPE_FP32"}
    out = {}
    for v in values:
        t = v.type.tensor_type
        out[v.name] = (onnx_to_triton[t.elem_type], [d.dim_value for d in t.shape.dim[1:]])
    return out


def test_config_matches_the_onnx_graph(decoder, tmp_path):
    repo = write_triton_repository(decoder, tmp_path / "models", name="vae", max_batch=32)
    config = parse(repo.config)
    assert repo.config == tmp_path / "models" / "vae" / "config.pbtxt"
    assert config.name == "vae" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 2000

    proto = onnx.load(str(decoder))
    dtype_name = model_config_pb2.DataType.Name
    got_inputs = {t.name: (dtype_name(t.data_type), list(t.dims)) for t in config.input}
    got_outputs = {t.name: (dtype_name(t.data_type), list(t.dims)) for t in config.output}
    assert got_inputs == _graph_tensors(proto, proto.graph.input) == {"z": ("TYPE_FP32", [LATENT])}
    assert got_outputs == _graph_tensors(proto, proto.graph.output)
    assert got_outputs["mean"] == ("TYPE_FP32", list(SHAPE))
    assert all(d.dim_param for v in [*proto.graph.input, *proto.graph.output] for d in v.type.tensor_type.shape.dim[:1])

    metadata = {p.key: p.value for p in proto.metadata_props}
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters == metadata and parameters["latent_dim"] == str(LATENT)  # JSON values survive quoting


def test_model_file_is_the_decoder_and_runs(decoder, tmp_path):
    import onnxruntime as ort

    from fastvae.export import OnnxSampler

    repo = write_triton_repository(decoder, tmp_path / "models")
    assert repo.model == tmp_path / "models" / "fastvae_decoder" / "1" / "model.onnx"
    assert repo.model.read_bytes() == decoder.read_bytes()
    z = np.random.default_rng(0).standard_normal((4, LATENT), dtype=np.float32)
    session = ort.InferenceSession(str(repo.model), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(["mean"], {"z": z})[0], OnnxSampler(decoder).decode(z))


def test_rewrites_atomically_with_umask_permissions(decoder, tmp_path):
    old = os.umask(0o027)
    try:
        write_triton_repository(decoder, tmp_path / "m", max_batch=8)
        repo = write_triton_repository(decoder, tmp_path / "m", max_batch=16)  # over the first
    finally:
        os.umask(old)
    assert parse(repo.config).max_batch_size == 16
    folder = tmp_path / "m" / "fastvae_decoder"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    assert names == ["1", "1/model.onnx", "config.pbtxt"]  # no temporary files left
    assert (repo.config.stat().st_mode & 0o777) == 0o640 == (repo.model.stat().st_mode & 0o777)


def test_the_largest_int32_max_batch_parses(decoder, tmp_path):
    """max_batch_size is an int32 in Triton's schema: 2**31 - 1 is written and parses."""
    repo = write_triton_repository(decoder, tmp_path / "m", max_batch=2**31 - 1)
    assert parse(repo.config).max_batch_size == 2**31 - 1


def test_a_queue_delay_triton_would_refuse_is_refused_here(decoder, tmp_path):
    """-5 was written into config.pbtxt (Triton refuses the model when it loads it), "5" too."""
    from fastvae.errors import FastVAEError

    for delay in (-5, "5", 10**12):
        with pytest.raises(FastVAEError, match="max_queue_delay_us must be an integer from 0"):
            write_triton_repository(decoder, tmp_path / "m", max_queue_delay_us=delay)
    assert not (tmp_path / "m").exists()
    repo = write_triton_repository(decoder, tmp_path / "m", max_queue_delay_us=0)
    assert parse(repo.config).dynamic_batching.max_queue_delay_microseconds == 0


def test_newer_version_folders_are_kept_and_named_in_a_note(decoder, tmp_path):
    """A DIR/NAME/2 from elsewhere would be served instead of this export's 1 (Triton's default
    version policy: the latest): left in place (the user's files) but named in the summary."""
    folder = tmp_path / "m" / "fastvae_decoder"
    for version in ("0", "2", "10"):
        (folder / version).mkdir(parents=True)
    (folder / "10" / "model.onnx").write_bytes(b"someone else's model")
    repo = write_triton_repository(decoder, tmp_path / "m")
    lines = repo.summary().splitlines()
    assert repo.newer_versions == ("2", "10") and len(lines) == 2
    assert lines[1] == (f"note: {folder} also holds version folders 2, 10: Triton serves the highest version, "
                        "not this export's 1; move them away to serve this one")
    assert (folder / "10" / "model.onnx").read_bytes() == b"someone else's model"
    alone = write_triton_repository(decoder, tmp_path / "alone")
    assert alone.newer_versions == () and len(alone.summary().splitlines()) == 1


def test_quoting_survives_protobuf_parsing(decoder, tmp_path):
    from fastvae.export.onnx_export import _update_metadata

    tricky = tmp_path / "tricky.onnx"
    tricky.write_bytes(decoder.read_bytes())
    value = 'quote " back\\slash \n newline \t tab é ü 漢'
    _update_metadata(tricky, {"source": value})
    config = parse(write_triton_repository(tricky, tmp_path / "m").config)
    assert config.parameters["source"].string_value == value


@pytest.mark.parametrize("kwargs,message", [({"name": "a/b"}, "^name must"), ({"name": ""}, "^name must"),
                                            ({"max_batch": 0}, "^max_batch must"), ({"max_batch": 2.5}, "^max_batch must"),
                                            ({"max_batch": 2**31}, "from 1 to 2147483647")])
def test_bad_arguments(decoder, tmp_path, kwargs, message):
    """Named as the function's keywords (the command line's flags are fastvae export's)."""
    with pytest.raises(FastVAEError, match=message) as refused:
        write_triton_repository(decoder, tmp_path / "m", **kwargs)
    assert "--" not in str(refused.value)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("file_at", ["repo", "repo/m", "repo/m/1"])
def test_a_file_where_a_folder_goes_is_refused_before_anything_is_written(decoder, tmp_path, file_at):
    """A file at DIR/NAME/1 passed the checks and failed ("File exists") after fastvae export
    had replaced the decoder."""
    target = tmp_path / file_at
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("mine")
    with pytest.raises(FastVAEError, match=rf"{target} is a file where .* goes: move it away"):
        write_triton_repository(decoder, tmp_path / "repo", name="m")
    assert target.read_text() == "mine"


def test_the_config_shows_the_run_folders_name_not_the_exporting_machines_path(decoder, tmp_path):
    """Triton's model-config endpoint shows the parameters: the service's /metadata already cut
    source to the run folder's name."""
    from fastvae.export.onnx_export import _update_metadata

    copy = tmp_path / "decoder.onnx"
    copy.write_bytes(decoder.read_bytes())
    _update_metadata(copy, {"source": "/home/someone/secret/runs/mnist-run7"})
    config = parse(write_triton_repository(copy, tmp_path / "m").config)
    assert config.parameters["source"].string_value == "mnist-run7"


def test_an_encoder_is_refused_as_an_encoder(tmp_path):
    import torch

    from fastvae.export.encoder_export import export_encoder
    from fastvae.models import build_model

    torch.manual_seed(0)
    model = build_model({"model": "convkl", "data_shape": [3, 16, 16], "width": 4, "channel_mult": "",
                         "blocks_per_level": 1, "downsample": 2})
    encoder = export_encoder(model, tmp_path / "encoder.onnx").path
    with pytest.raises(FastVAEError, match=r"is a fastvae encoder: a Triton repository here serves a decoder"):
        write_triton_repository(encoder, tmp_path / "m")


def test_foreign_or_missing_files_are_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), foreign)
    with pytest.raises(FastVAEError, match="not a fastvae decoder"):
        write_triton_repository(foreign, tmp_path / "m")
    with pytest.raises(FastVAEError, match="could not be read"):
        write_triton_repository(tmp_path / "none.onnx", tmp_path / "m")


def test_cli_export_with_triton_repo(tmp_path, capsys):
    import torch

    from fastvae.checkpoint import save_checkpoint
    from fastvae.cli import main
    from fastvae.models import build_model

    torch.manual_seed(1)
    model = build_model({"data_shape": list(SHAPE), "hidden_dim": 16, "latent_dim": LATENT})
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.ckpt", {"config": {}, "spec": model.spec, "model": model.state_dict()})
    repo = tmp_path / "triton"
    (repo / "digits" / "2").mkdir(parents=True)  # an older export's newer version: named, kept
    assert main(["export", str(run), "--triton-repo", str(repo), "--name", "digits", "--max-batch", "128",
                 "--exporter", "torchscript"]) == 0
    out = capsys.readouterr().out
    assert "wrote Triton model 'digits'" in out
    assert f"note: {repo / 'digits'} also holds version folder 2: Triton serves the highest version" in out
    assert (repo / "digits" / "2").is_dir()
    config = parse(repo / "digits" / "config.pbtxt")
    assert config.max_batch_size == 128 and config.input[0].dims == [LATENT]
    assert (repo / "digits" / "1" / "model.onnx").read_bytes() == (run / "decoder.onnx").read_bytes()
    # --fp16 / --int8: each variant a model of its own, beside the fp32 one
    assert main(["export", str(run), "--triton-repo", str(repo), "--name", "v", "--fp16", "--int8",
                 "--exporter", "torchscript"]) == 0
    assert [line.split("'")[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("wrote Triton model")] == ["v", "v_fp16", "v_int8"]
    for model_name, file in (("v", "decoder.onnx"), ("v_fp16", "decoder.fp16.onnx"), ("v_int8", "decoder.int8.onnx")):
        assert parse(repo / model_name / "config.pbtxt").name == model_name
        assert (repo / model_name / "1" / "model.onnx").read_bytes() == (run / file).read_bytes()
    for bad in ("0", "3000000000"):  # 3e9: beyond Triton's int32, refused before any work
        assert main(["export", str(run), "--triton-repo", str(repo), "--max-batch", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--max-batch" in err[0], err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc (a folder no one can write in)")
def test_a_repository_that_cannot_be_written_fails_before_the_export(tmp_path, capsys):
    """It failed after the decoder file had been replaced (exit 2, the new decoder written)."""
    from fastvae.checkpoint import save_checkpoint
    from fastvae.cli import main
    from fastvae.models import build_model

    model = build_model({"data_shape": list(SHAPE), "hidden_dim": 16, "latent_dim": LATENT})
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.ckpt", {"config": {}, "spec": model.spec, "model": model.state_dict()})
    out = tmp_path / "d.onnx"
    assert main(["export", str(run), "--out", str(out), "--triton-repo", "/proc/fastvae-triton"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--triton-repo /proc/fastvae-triton cannot be written" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("fails", ["copying the model", "writing the config", "flushing the config"])
def test_a_failed_rewrite_replaces_nothing(decoder, tmp_path, monkeypatch, fails):
    """A full disk while the new files are written leaves the old model and config together
    (not a new model beside the old config), no staging files, and one line."""
    import errno
    import shutil

    from fastvae import run_folder

    first = write_triton_repository(decoder, tmp_path / "m", max_batch=8)
    before = {p: p.read_bytes() for p in (first.config, first.model)}
    # the new export: another decoder (wider latent), so a replaced model file would show
    other = exported_mlp_decoder(tmp_path, hidden_dim=16, latent_dim=LATENT + 1, likelihood="gaussian", sigma=0.3)[1]

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fails == "copying the model":
        monkeypatch.setattr(shutil, "copyfile", no_space)
    elif fails == "writing the config":
        write_text = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda path, *a, **k: no_space() if path.suffix == ".pbtxt"
                            else write_text(path, *a, **k))
    else:
        fsync = run_folder.fsync_file
        monkeypatch.setattr(run_folder, "fsync_file",
                            lambda path: no_space() if path.name == "config.pbtxt" else fsync(path))
    with pytest.raises(FastVAEError, match="could not write the Triton repository .*No space left"):
        write_triton_repository(other, tmp_path / "m", max_batch=16)
    assert {p: p.read_bytes() for p in before} == before
    folder = tmp_path / "m" / "fastvae_decoder"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt"]
    # a first export that fails leaves no model folder Triton would refuse to load
    with pytest.raises(FastVAEError):
        write_triton_repository(other, tmp_path / "fresh", max_batch=16)
    assert not (tmp_path / "fresh").exists() or list((tmp_path / "fresh").iterdir()) == []
