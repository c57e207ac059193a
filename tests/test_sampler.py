"""The torch-free ONNX sampler and ``fastvae sample``: determinism, file errors, no torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fastvae.errors import FastVAEError
from fastvae.export import OnnxSampler

LATENT = 4
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """A Bernoulli MLP decoder (default exporter) and a Gaussian one (TorchScript exporter)."""
    import torch

    from fastvae.export import export_decoder
    from fastvae.models import build_model

    folder = tmp_path_factory.mktemp("decoders")
    out = {}
    for likelihood, exporter in (("bernoulli", "auto"), ("gaussian", "torchscript")):
        torch.manual_seed(0)
        model = build_model({"data_shape": list(SHAPE), "hidden_dim": 16, "latent_dim": LATENT,
                             "likelihood": likelihood, "sigma": 0.2})
        out[likelihood] = export_decoder(model, folder / f"{likelihood}.onnx", exporter=exporter).path
    return out


@pytest.fixture()
def path(decoders):
    return decoders["bernoulli"]


def test_sample_shape_range_and_attributes(path):
    sampler = OnnxSampler(path, threads=1)
    assert sampler.latent_dim == LATENT and sampler.output_shape == SHAPE
    assert sampler.metadata["likelihood"] == "bernoulli" and sampler.precision == "fp32"
    x = sampler.sample(10, seed=0)
    assert x.shape == (10, *SHAPE) and x.dtype == np.float32
    assert np.all((x >= 0) & (x <= 1))
    assert sampler.sample(0, seed=0).shape == (0, *SHAPE)
    assert "latent_dim=4" in repr(sampler)


def test_same_seed_same_samples_whatever_the_batch_size(path):
    sampler = OnnxSampler(path)
    a = sampler.sample(300, seed=7)
    np.testing.assert_array_equal(a, OnnxSampler(path, threads=1).sample(300, seed=7))
    for batch_size in (1, 37, 64, 1000):
        np.testing.assert_allclose(sampler.sample(300, seed=7, batch_size=batch_size), a, rtol=0, atol=1e-6)
    assert not np.allclose(sampler.sample(300, seed=8), a)
    # the first samples do not depend on how many are drawn
    np.testing.assert_allclose(sampler.sample(10, seed=7), a[:10], rtol=0, atol=1e-6)


def test_sample_is_decode_of_seeded_normal_draws(path):
    sampler = OnnxSampler(path)
    z = np.random.default_rng(3).standard_normal((20, LATENT), dtype=np.float32)
    np.testing.assert_allclose(sampler.sample(20, seed=3), sampler.decode(z), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sampler.decode(z.astype(np.float64)), sampler.decode(z), rtol=0, atol=1e-6)


def test_mode_sample_draws_from_the_likelihood(decoders):
    bern = OnnxSampler(decoders["bernoulli"])
    x = bern.sample(200, seed=0, mode="sample")
    assert set(np.unique(x)) <= {0.0, 1.0}
    np.testing.assert_array_equal(x, bern.sample(200, seed=0, batch_size=7, mode="sample"))
    gauss = OnnxSampler(decoders["gaussian"])
    assert gauss.sigma == pytest.approx(0.2)
    noise = gauss.sample(500, seed=0, mode="sample") - gauss.sample(500, seed=0)
    assert abs(noise.std() - 0.2) < 0.01
    with pytest.raises(FastVAEError, match="mode"):
        gauss.sample(2, mode="median")


def test_bad_arguments(path):
    sampler = OnnxSampler(path)
    with pytest.raises(FastVAEError, match=r"z must have shape \(n, 4\)"):
        sampler.decode(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(FastVAEError, match="z must have shape"):
        sampler.decode(np.zeros(LATENT, dtype=np.float32))
    with pytest.raises(FastVAEError, match="n must be"):
        sampler.sample(-1)
    with pytest.raises(FastVAEError, match="batch_size"):
        sampler.sample(3, batch_size=0)
    with pytest.raises(FastVAEError, match=r"1000000000000 latents of shape \(4,\) need about .* GiB .*, more than the memory free here.*a smaller n, in several calls"):
        sampler.sample(10**12)  # was numpy's MemoryError naming an array shape
    with pytest.raises(FastVAEError, match=r"z must be an array of numbers \(n, 4\): .*inhomogeneous"):
        sampler.decode([[0.0] * LATENT, [0.0]])  # numpy's own ValueError
    with pytest.raises(FastVAEError, match="beyond float32's range"):
        sampler.decode(np.full((2, LATENT), 1e300))  # was inf with a numpy RuntimeWarning
    # float32 latents pass unchecked (the per-call cost): NaN decodes to NaN, as in torch
    assert np.isnan(sampler.decode(np.full((1, LATENT), np.nan, np.float32))).all()
    with pytest.raises(FastVAEError, match="threads"):
        OnnxSampler(path, threads=0)
    cpus = os.cpu_count() or 1
    with pytest.raises(FastVAEError, match=f"from 1 to {cpus}"):  # no session of 10^5 threads
        OnnxSampler(path, threads=100_000)


# -- broken files --------------------------------------------------------------------------------
def _foreign_onnx(target):
    """A valid ONNX model that is not a fastvae decoder."""
    node = helper.make_node("Relu", ["z"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", LATENT])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", LATENT])],
    )
    # IR 8 (opset 17's): make_model's default is onnx's newest IR, which an older onnxruntime
    # refuses to load (onnx 1.23.1 writes IR 14, onnxruntime 1.30 reads up to 13)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, target)


def _with_metadata(source, target, **changes):
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key in changes:
            prop.value = changes[prop.key]
    onnx.save(model, target)


BROKEN = {
    "missing": (lambda good, p: None, "does not exist"),
    "empty": (lambda good, p: p.write_bytes(b""), "is empty"),
    "folder": (lambda good, p: p.mkdir(), "is a folder"),
    "garbage": (lambda good, p: p.write_bytes(b"\x00not an onnx model\xff" * 50), "could not be loaded"),
    "text": (lambda good, p: p.write_text("hello"), "could not be loaded"),
    "truncated_half": (lambda good, p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2]), ""),
    "truncated_tail": (lambda good, p: p.write_bytes(good.read_bytes()[:-5]), ""),
    "foreign_onnx": (lambda good, p: _foreign_onnx(p), "not a fastvae decoder"),
    "wrong_latent_dim": (lambda good, p: _with_metadata(good, p, latent_dim="5"), "disagree"),
    "wrong_shape": (lambda good, p: _with_metadata(good, p, output_shape="[3, 8, 8]"), "disagree"),
    "damaged_metadata": (lambda good, p: _with_metadata(good, p, output_shape="[3, 8"), "damaged"),
    "newer_format": (lambda good, p: _with_metadata(good, p, fastvae_format_version="99"), "newer fastvae"),
}


@pytest.fixture(params=sorted(BROKEN))
def broken(request, path, tmp_path):
    make, message = BROKEN[request.param]
    target = tmp_path / "bad.onnx"
    make(path, target)
    return target, message


def test_broken_files_give_one_clear_error(broken):
    target, message = broken
    with pytest.raises(FastVAEError, match=message or None) as info:
        OnnxSampler(target)
    text = str(info.value)
    assert str(target) in text and "\n" not in text


@pytest.mark.parametrize("changes", [{"sigma": "nan"}, {"sigma": "-1"}, {"sigma": "inf"}, {"output_shape": "[1, 0, 8]"}])
def test_metadata_that_would_make_nan_or_empty_outputs_is_refused(decoders, tmp_path, changes):
    """sigma=nan decoded every mode-"sample" value to NaN, without a word."""
    _with_metadata(decoders["gaussian"], tmp_path / "bad.onnx", **changes)
    with pytest.raises(FastVAEError, match="inconsistent fastvae metadata"):
        OnnxSampler(tmp_path / "bad.onnx")


def test_cli_broken_file_is_one_line_exit_2(broken, tmp_path, capsys):
    from fastvae.cli import main

    target, message = broken
    assert main(["sample", str(target), "-n", "4", "--out", str(tmp_path / "s.png")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvae sample: error:") and message in lines[0]
    assert not (tmp_path / "s.png").exists()


# -- the command line and the torch-free promise ---------------------------------------------
@pytest.mark.parametrize("command", ["sample", "decode", "serve"])
def test_cli_counts_and_threads_are_named_by_their_flags(path, tmp_path, capsys, command):
    """The library's refusals named its parameters ("n must be ...", "batch_size ...")."""
    from fastvae.cli import main

    extra = {"sample": ["--out", str(tmp_path / "s.npy")], "decode": [str(tmp_path / "z.npy"), "--out",
             str(tmp_path / "d.npy")], "serve": ["--port", "0"]}[command]
    cases = [("--threads", "0", "argument --threads: must be an integer from 1 to"),
             ("--threads", str((os.cpu_count() or 1) + 1), "argument --threads: must be an integer from 1 to")]
    if command == "sample":
        cases += [("-n", "-5", "argument -n/--num-samples: must be an integer >= 0"),
                  ("--batch-size", "0", "argument --batch-size: must be an integer >= 1")]
    for flag, value, message in cases:
        with pytest.raises(SystemExit) as exited:  # argparse's own exit
            main([command, str(path), *extra, flag, value])
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_cli_sample_png_and_npy(path, tmp_path, capsys):
    from PIL import Image

    from fastvae.cli import main

    png, npy = tmp_path / "s.png", tmp_path / "sub" / "s.npy"
    assert main(["sample", str(path), "-n", "16", "--seed", "1", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 8
    assert main(["sample", str(path), "-n", "16", "--seed", "1", "--batch-size", "5", "--threads", "1",
                 "--out", str(npy)]) == 0
    np.testing.assert_allclose(np.load(npy), OnnxSampler(path).sample(16, seed=1), rtol=0, atol=1e-6)
    assert "wrote" in capsys.readouterr().out
    assert main(["sample", str(path), "--out", str(tmp_path / "s.jpg")]) == 2
    assert ".png" in capsys.readouterr().err
    assert main(["sample", str(path), "-n", "3", "--nrow", "2", "--out", str(tmp_path / "s.npy")]) == 2
    assert "--nrow" in capsys.readouterr().err  # not silently ignored
    # more images per row than images: one row (a huge value was a numpy traceback)
    for nrow in ("3", "99999999999999999999"):
        assert main(["sample", str(path), "-n", "3", "--nrow", nrow, "--out", str(tmp_path / "sub" / f"row{len(nrow)}.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "sub" / "row1.png").size == Image.open(tmp_path / "sub" / "row20.png").size
    upper = tmp_path / "S.NPY"  # numpy appends ".npy" to a file name not ending in it
    assert main(["sample", str(path), "-n", "3", "--seed", "1", "--out", str(upper)]) == 0
    np.testing.assert_array_equal(np.load(upper), OnnxSampler(path).sample(3, seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S.NPY", "s.png", "sub"]  # no temporary files
    capsys.readouterr()
    for flags in (["sample", str(path), "-n", str(10**20), "--out", str(tmp_path / "h.npy")],
                  ["bench-sampler", str(path), "--batch-sizes", str(10**20), "--seconds", "0.1"]):
        assert main(flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "smaller" in err[0], err


def test_an_autoencoder_decoder_is_not_sampled_from_a_prior(tmp_path, capsys):
    """An autoencoder has no prior: z ~ N(0, I) would decode to noise far from its codes."""
    import torch

    from fastvae.cli import main
    from fastvae.export import export_decoder
    from fastvae.models import build_model

    torch.manual_seed(0)
    model = build_model({"data_shape": list(SHAPE), "hidden_dim": 16, "latent_dim": LATENT, "kind": "ae"})
    path = export_decoder(model, tmp_path / "ae.onnx").path
    sampler = OnnxSampler(path)
    assert not sampler.has_prior
    with pytest.raises(FastVAEError, match="autoencoder"):
        sampler.sample(4, seed=0)
    z = np.random.default_rng(0).standard_normal((4, LATENT), dtype=np.float32)
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(sampler.decode(z), expected.reshape(4, *SHAPE), rtol=1e-4, atol=1e-5)
    assert main(["sample", str(path), "-n", "4", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fastvae decode" in err[0], err
    # ... and 'fastvae decode' (which took spatial latents only) decodes the codes
    np.save(tmp_path / "codes.npy", z.astype(np.float64))
    assert main(["decode", str(path), str(tmp_path / "codes.npy"), "--out", str(tmp_path / "x.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), expected.reshape(4, *SHAPE), rtol=1e-4, atol=1e-5)
    assert main(["decode", str(path), str(tmp_path / "codes.npy"), "--out", str(tmp_path / "pngs")]) == 0
    from PIL import Image

    pngs = sorted((tmp_path / "pngs").iterdir())
    assert [p.name for p in pngs] == [f"000{i}.png" for i in range(4)]
    pixels = np.stack([np.asarray(Image.open(p)) for p in pngs]).astype(np.float64)
    np.testing.assert_allclose(pixels, np.clip(expected.reshape(4, 8, 8), 0, 1) * 255, atol=0.51)
    capsys.readouterr()
    np.save(tmp_path / "wide.npy", np.zeros((4, LATENT + 1), np.float32))
    for args, words in (([str(tmp_path / "codes.npy"), "--tile", "8"], ("--tile", "flat codes")),
                        ([str(tmp_path / "wide.npy")], ("shape (4, 5)", f"(n, {LATENT})"))):
        assert main(["decode", str(path), *args, "--out", str(tmp_path / "y.npy")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not (tmp_path / "y.npy").exists()


def test_seeds_paths_and_complex_latents_are_clear_errors(path):
    """numpy's own errors named the wrong thing (seed "1": "not 1"), complex latents lost their
    imaginary parts with a warning, OnnxSampler(None) was a pathlib TypeError."""
    sampler = OnnxSampler(path)
    for seed in ("1", -1, 1.5, True, 2**128):
        with pytest.raises(FastVAEError, match=r"seed must be None, a numpy Generator or an integer from 0 to 2\*\*128 - 1"):
            sampler.sample(2, seed=seed)
    assert sampler.sample(1, seed=2**128 - 1).shape[0] == 1  # the largest the service takes too
    np.testing.assert_array_equal(sampler.sample(2, seed=np.int64(3)), sampler.sample(2, seed=3))
    with pytest.raises(FastVAEError, match="real numbers"):
        sampler.decode(np.zeros((2, LATENT), np.complex64))
    with pytest.raises(FastVAEError, match="path of a decoder"):
        OnnxSampler(None)


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
from fastvae.export import OnnxSampler
x = OnnxSampler(sys.argv[1]).sample(50, seed=0, batch_size=16)
assert x.shape[0] == 50
from fastvae.cli import main
rc = main(["sample", sys.argv[1], "-n", "9", "--out", sys.argv[2]])
assert rc == 0, rc
sys.modules.pop("torch")
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok")
"""


def test_sampler_and_sample_command_never_import_torch(path, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NO_TORCH), str(path), str(tmp_path / "s.npy")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
    assert np.load(tmp_path / "s.npy").shape == (9, *SHAPE)


def test_real_cli_process_prints_no_traceback(path, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(path.read_bytes()[:1000])
    result = subprocess.run(
        [sys.executable, "-m", "fastvae", "sample", str(bad), "-n", "4", "--out", str(tmp_path / "s.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "bad.onnx" in result.stderr


def test_metadata_is_json_friendly(path):
    meta = OnnxSampler(path).metadata
    assert json.loads(meta["output_shape"]) == list(SHAPE)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


def test_sampler_threads_stop_spinning_when_a_run_returns(tmp_path):
    """Workers spin only during a run: an idle sampler uses no CPU, unlike onnxruntime's default
    (spinning on after each run), which slows whatever runs next on the same cores."""
    import time

    import onnxruntime as ort
    import torch

    from fastvae.export import export_decoder
    from fastvae.models import build_model

    torch.manual_seed(0)
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 512, "latent_dim": 8})
    path = export_decoder(model, tmp_path / "d.onnx", check_batches=(3,)).path
    z = np.random.default_rng(0).standard_normal((1000, 8), dtype=np.float32)

    def idle_cpu_seconds(run):
        for _ in range(5):
            run()
        start = time.process_time()  # all threads of this process
        time.sleep(0.3)  # not synchronisation: the window measured, CPU spent while idle
        return time.process_time() - start

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    default = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    baseline = idle_cpu_seconds(lambda: default.run(None, {"z": z}))
    if baseline < 0.01:
        pytest.skip(f"onnxruntime's default did not spin after a run here ({baseline:.3f} CPU s)")
    sampler = OnnxSampler(path, threads=2)
    assert idle_cpu_seconds(lambda: sampler.decode(z)) < 0.01 < baseline


def test_cli_sample_takes_every_seed_the_service_takes(path, tmp_path, capsys):
    """--seed stopped at 2**32 - 1 (the training seed's range) while /sample and
    OnnxSampler.sample take up to 2**128 - 1: a served seeded sample could not be drawn again."""
    from fastvae.cli import main

    big = 2**128 - 1
    assert main(["sample", str(path), "-n", "3", "--seed", str(big), "--out", str(tmp_path / "b.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), OnnxSampler(path).sample(3, seed=big))
    for bad in (str(2**128), "-1", "x"):
        with pytest.raises(SystemExit) as exited:
            main(["sample", str(path), "--seed", bad, "--out", str(tmp_path / "c.npy")])
        assert exited.value.code == 2 and "2**128 - 1" in capsys.readouterr().err
