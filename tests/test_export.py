"""ONNX export of decoders: validity, parity with torch, metadata, fp16/int8 variants, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fastvae.errors import FastVAEError
from fastvae.export import ExportReport, OnnxSampler, export_decoder, variant_path
from fastvae.export import onnx_export
from fastvae.models import build_model

SHAPE = [1, 8, 8]
LATENT = 4


def _model(model="mlp", likelihood="bernoulli", kind="vae", seed=0, **extra):
    torch.manual_seed(seed)
    spec = {"data_shape": SHAPE, "model": model, "hidden_dim": 16, "latent_dim": LATENT,
            "likelihood": likelihood, "kind": kind, **extra}
    return build_model(spec).eval()


def _torch_mean_params(model, z: np.ndarray):
    with torch.inference_mode():
        params = model.decoder(torch.from_numpy(z))
        mean = torch.sigmoid(params) if model.likelihood.kind == "bernoulli" else params
    return mean.numpy(), params.numpy()


@pytest.fixture(scope="module", params=[("mlp", "bernoulli"), ("conv", "gaussian")], ids=["mlp", "conv"])
def exported(request, tmp_path_factory):
    arch, likelihood = request.param
    model = _model(arch, likelihood, sigma=0.3)
    path = tmp_path_factory.mktemp(arch) / "decoder.onnx"
    report = export_decoder(model, path, fp16=True, int8=True)
    return model, path, report


def test_export_is_valid_onnx_with_symbolic_batch(exported):
    _, path, report = exported
    assert isinstance(report, ExportReport) and report.path == path and path.is_file()
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["z"]
    assert [o.name for o in proto.graph.output] == ["mean", "params"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert not list(path.parent.glob(".*tmp*")), "temporary files left behind"
    assert report.size_bytes == path.stat().st_size
    assert not list(path.parent.glob("*.data")), "small models must be self-contained"


@pytest.mark.parametrize("batch", [1, 37, 1000])
def test_onnxruntime_matches_torch(exported, batch):
    model, path, _ = exported
    z = np.random.default_rng(batch).standard_normal((batch, LATENT), dtype=np.float32)
    mean, params = _torch_mean_params(model, z)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_mean, got_params = session.run(["mean", "params"], {"z": z})
    assert got_mean.shape == (batch, *SHAPE)
    np.testing.assert_allclose(got_params, params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(OnnxSampler(path).decode(z, batch_size=64), mean, rtol=1e-4, atol=1e-5)


def test_report_records_validation(exported):
    _, path, report = exported
    assert set(report.parity) == set(onnx_export.CHECK_BATCHES)
    assert onnx_export.EXPORT_BATCH not in report.parity
    assert 0 <= report.max_abs_error < 1e-5
    assert report.latent_dim == LATENT and report.output_shape == tuple(SHAPE)
    text = report.summary()
    assert str(path) in text and "parity" in text and "fp16" in text and "int8" in text
    assert report.paths == [path, variant_path(path, "fp16"), variant_path(path, "int8")]


def test_metadata_round_trip(exported):
    model, path, report = exported
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    import fastvae

    assert meta["fastvae_format"] == "fastvae-decoder" and meta["fastvae_version"] == fastvae.__version__
    assert int(meta["latent_dim"]) == LATENT and json.loads(meta["output_shape"]) == SHAPE
    assert meta["precision"] == "fp32" and meta["source"] == "<in-memory module>"
    assert json.loads(meta["model_spec"])["model"] == model.spec["model"]
    assert float(meta["max_abs_error_vs_torch"]) == pytest.approx(report.max_abs_error, rel=1e-2, abs=1e-12)
    kind = model.likelihood.kind
    assert meta["likelihood"] == kind
    assert meta["output_transform"] == {"bernoulli": "sigmoid", "gaussian": "identity"}[kind]
    assert meta["sample"] == kind
    if kind == "gaussian":
        assert float(meta["sigma"]) == pytest.approx(0.3)
    sampler = OnnxSampler(path)
    assert sampler.metadata == meta
    assert sampler.latent_dim == LATENT and sampler.output_shape == tuple(SHAPE)


def test_variants_are_small_and_close(exported):
    model, path, report = exported
    fp32_size = path.stat().st_size
    by_name = {v.precision: v for v in report.variants}
    assert set(by_name) == {"fp16", "int8"}
    for precision, variant in by_name.items():
        assert variant.path == variant_path(path, precision) and variant.path.is_file()
        onnx.checker.check_model(str(variant.path), full_check=True)
        meta = {p.key: p.value for p in onnx.load(str(variant.path)).metadata_props}
        assert meta["precision"] == precision
        assert float(meta["max_abs_error_vs_fp32"]) == pytest.approx(variant.max_abs_error, rel=1e-2, abs=1e-12)
        assert float(meta["max_abs_error_mean_vs_fp32"]) == pytest.approx(variant.max_abs_error_mean, rel=1e-2, abs=1e-12)
        assert variant.size_bytes < fp32_size
        sampler = OnnxSampler(variant.path)  # same interface, float32 in and out
        assert sampler.precision == precision and sampler.sample(5, seed=1).dtype == np.float32
    assert 0 < by_name["fp16"].max_abs_error < 1e-2 and by_name["fp16"].max_abs_error_mean < 5e-3
    assert 0 < by_name["int8"].max_abs_error < 0.25 and by_name["int8"].max_abs_error_mean < 0.1
    # the same bounds held against the torch decoder itself, on latents of our own
    z = np.random.default_rng(7).standard_normal((256, LATENT)).astype(np.float32)
    reference = _torch_mean_params(model, z)[0]
    gaps = {precision: float(np.abs(OnnxSampler(v.path).decode(z) - reference).max())
            for precision, v in by_name.items()}
    assert gaps["fp16"] < 5e-3 and gaps["int8"] < 0.05, gaps


def _transpose_gemm_weights_in_place(model) -> int:
    """What onnxruntime's dynamic quantizer did before 1.32 ahead of its shape inference: each
    Gemm(transB=1) on a weight gets the weight transposed under its own name; returns how many."""
    weights = {t.name: t for t in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        trans_b = next((a for a in node.attribute if a.name == "transB"), None)
        if node.op_type != "Gemm" or trans_b is None or trans_b.i != 1 or node.input[1] not in weights:
            continue
        weight = weights[node.input[1]]
        weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight).T.copy(), weight.name))
        trans_b.i = 0
        count += 1
    return count


def test_every_file_passes_strict_shape_inference(exported):
    """All files are self-consistent, also after onnxruntime < 1.32 rewrites their weights in
    place: torch's dynamo exporter wrote value_info for every weight, which then went stale and
    made quantize_dynamic (ort 1.30) fail on every decoder."""
    _, path, report = exported
    for file in report.paths:
        onnx.shape_inference.infer_shapes(onnx.load(str(file)), strict_mode=True)
    model = onnx.load(str(path))
    assert _transpose_gemm_weights_in_place(model) > 0
    onnx.shape_inference.infer_shapes(model, strict_mode=True)  # "existing shape differ" before the fix
    weights = {t.name for t in model.graph.initializer}
    assert not [v.name for v in model.graph.value_info if v.name in weights], "value_info on weights"


def test_stacked_autoencoder_and_torchscript_opset(tmp_path):
    model = _model(kind="ae")
    report = export_decoder(model, tmp_path / "ae.onnx", exporter="torchscript", opset=17)
    assert report.opset == 17 and "TorchScript" in report.exporter
    meta = OnnxSampler(report.path).metadata
    assert (meta["likelihood"], meta["output_transform"], meta["sample"]) == ("none", "sigmoid", "none")
    z = np.random.default_rng(0).standard_normal((9, LATENT), dtype=np.float32)
    with torch.inference_mode():
        expected = model.decode(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(OnnxSampler(report.path).decode(z), expected, rtol=1e-4, atol=1e-5)


class _FabricLike(torch.nn.Module):
    """Stands in for lightning_fabric's _FabricModule (holds the model as ``_forward_module``)."""

    def __init__(self, module):
        super().__init__()
        self._forward_module = module


class _CompiledLike(torch.nn.Module):
    """Stands in for torch.compile's OptimizedModule (holds the model as ``_orig_mod``); the real
    one imports inductor, which takes seconds."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module


def test_exports_fp32_copy_of_wrapped_low_precision_model(tmp_path):
    model = _model(seed=3)
    reference = _model(seed=3).to(torch.bfloat16).float()  # what bf16 weights are worth in fp32
    model = model.to(torch.bfloat16).train()
    wrapped = _FabricLike(_CompiledLike(model))  # unwrap: Fabric -> torch.compile -> VAE
    report = export_decoder(wrapped, tmp_path / "bf16.onnx", exporter="torchscript")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.training, "model must be left as it was"
    z = np.random.default_rng(0).standard_normal((37, LATENT), dtype=np.float32)
    np.testing.assert_allclose(OnnxSampler(report.path).decode(z), _torch_mean_params(reference, z)[0],
                               rtol=1e-4, atol=1e-5)


def test_failed_export_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "decoder.onnx"
    export_decoder(_model(), path, exporter="torchscript")  # (the fast exporter: same file logic)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise FastVAEError("simulated validation failure")

    monkeypatch.setattr(onnx_export, "_parity", broken)
    with pytest.raises(FastVAEError, match="simulated"):
        export_decoder(_model(seed=1), path, int8=True, exporter="torchscript")
    assert path.read_bytes() == before
    assert not variant_path(path, "int8").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"], "temporary files left behind"

    def checker_rejects(p):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.undo()
    monkeypatch.setattr(onnx_export, "_check", checker_rejects)
    with pytest.raises(FastVAEError, match="onnx.checker"):
        export_decoder(_model(seed=1), path, exporter="torchscript")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"]

    def disk_full(proto, target):  # half a file, then the disk is full
        target.write_bytes(proto.SerializeToString()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.undo()
    monkeypatch.setattr(onnx_export, "_save", disk_full)
    with pytest.raises(FastVAEError, match="No space left"):
        export_decoder(_model(seed=1), path, exporter="torchscript")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"]


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(FastVAEError, match="does not exist"):
        export_decoder(tmp_path / "no-such-run", tmp_path / "d.onnx")
    with pytest.raises(FastVAEError, match="not a fastvae model"):
        export_decoder(torch.nn.Linear(2, 2), tmp_path / "d.onnx")
    with pytest.raises(FastVAEError, match="opset"):
        export_decoder(_model(), tmp_path / "d.onnx", opset=3)
    with pytest.raises(FastVAEError, match="opset 12 is too old"):  # torch.onnx failed there, loudly
        export_decoder(_model(), tmp_path / "d.onnx", opset=12)
    with pytest.raises(FastVAEError, match="is a folder"):
        export_decoder(_model(), tmp_path)
    # wrong types read as something else: fp16="no" wrote an fp16 file, a negative tolerance
    # blamed the export ("try another --opset"), check_batches=5 was a TypeError
    for kwargs, words in (({"fp16": "no"}, "fp16 must be True or False"), ({"rtol": -1}, "rtol must be"),
                          ({"check_batches": 5}, "check_batches must be"), ({"atol": "x"}, "atol must be")):
        with pytest.raises(FastVAEError, match=words):
            export_decoder(_model(), tmp_path / "d.onnx", **kwargs)
    with pytest.raises(FastVAEError, match="path must be"):
        export_decoder(_model(), None)
    assert not (tmp_path / "d.onnx").exists() and not (tmp_path / "d.fp16.onnx").exists()


@pytest.fixture()
def run_dir(tmp_path):
    from fastvae.checkpoint import save_checkpoint

    model = _model(seed=5)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.ckpt", {"config": {}, "spec": model.spec, "model": model.state_dict()})
    return run, model


def test_cli_export_from_run_folder(run_dir, capsys):
    from fastvae.cli import main

    run, model = run_dir
    assert main(["export", str(run), "--int8"]) == 0  # default --out: RUN/decoder.onnx
    out = capsys.readouterr().out
    path = run / "decoder.onnx"
    assert f"wrote {path}" in out and "parity" in out and "int8" in out
    assert variant_path(path, "int8").is_file()
    sampler = OnnxSampler(path)
    assert sampler.metadata["source"] == str(run)
    z = np.random.default_rng(0).standard_normal((37, LATENT), dtype=np.float32)
    np.testing.assert_allclose(sampler.decode(z), _torch_mean_params(model, z)[0], rtol=1e-4, atol=1e-5)


def test_cli_export_names_what_killed_exports_left(run_dir, capsys):
    """A killed export leaves its hidden staging folder; each later export added another and
    said nothing (decode names its own): named, never removed (another export may be writing)."""
    from fastvae.cli import main

    run, _ = run_dir
    left = run / ".decoder.onnx.tmp-999999"
    left.mkdir()
    (left / "decoder.onnx").write_bytes(b"half")
    assert main(["export", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"note: {left} was left by a 'fastvae export' that did not finish" in err and left.is_dir()


def test_cli_reexport_names_older_variants_and_records_absolute_source(run_dir, capsys, monkeypatch):
    """A variant left from an earlier model (train on, export without --int8) served that model
    beside the new decoder.onnx, silently; a variant's metadata carried the fp32 file's error;
    "source" was the path as typed ("run", or "." inside the run folder)."""
    from fastvae.cli import main

    run, _ = run_dir
    monkeypatch.chdir(run.parent)
    assert main(["export", "run", "--fp16", "--int8"]) == 0
    for precision in ("fp16", "int8"):
        meta = OnnxSampler(variant_path(run / "decoder.onnx", precision)).metadata
        assert meta["source"] == str(run)
        assert meta["max_abs_error_vs_torch"] == meta["max_abs_error_vs_fp32"]
        assert float(meta["max_abs_error_vs_torch"]) > float(OnnxSampler(run / "decoder.onnx").metadata[
            "max_abs_error_vs_torch"])
    assert main(["export", "run"]) == 0  # the same checkpoint: the variants still belong to it
    assert "note:" not in capsys.readouterr().err
    checkpoint = run / "checkpoints" / "last.ckpt"
    later = (run / "decoder.int8.onnx").stat().st_mtime + 10  # trained on since
    os.utime(checkpoint, (later, later))
    assert main(["export", "run", "--fp16"]) == 0
    err = capsys.readouterr().err
    assert f"note: {Path('run') / 'decoder.int8.onnx'} beside {Path('run') / 'decoder.onnx'} is older than" in err
    assert "export again with --int8" in err and "fp16" not in err


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    from fastvae.cli import main

    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastvae export: error:") and "does not exist" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "d.onnx")
