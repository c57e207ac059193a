"""The latency-tuned sampler: thread regimes, IO-bound chunks, execution providers, bench-sampler."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from fastvae.errors import FastVAEError
from fastvae.export import OnnxSampler, providers
from testkit import exported_mlp_decoder

LATENT = 6
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """(torch model, decoder.onnx) for a digits-sized MLP decoder."""
    return exported_mlp_decoder(tmp_path_factory.mktemp("latency"), hidden_dim=256, latent_dim=LATENT)


def _torch_means(model, z):
    import torch

    with torch.inference_mode():
        return torch.sigmoid(model.decoder(torch.from_numpy(z))).numpy()


def test_threads_follow_the_measured_rule(decoder):
    _, path = decoder
    sampler = OnnxSampler(path)
    regimes = sampler._regimes
    if len(regimes.sessions) == 1:
        pytest.skip("one core: one session")
    # ~1 us per row here: the switch lies well inside (1, 10000) rows
    assert 1 <= regimes.parallel_from < 10_000 and regimes.per_row_us > 0
    assert regimes.parallel_from == max(2, round(100 / regimes.per_row_us)) or regimes.parallel_from == 1
    if regimes.parallel_from > 1:
        assert sampler.threads_for(1) == sampler.threads_for(regimes.parallel_from - 1) == 1
    assert sampler.threads_for(regimes.parallel_from) is None  # onnxruntime's default: all cores
    # explicit threads: one session whatever the batch size
    fixed = OnnxSampler(path, threads=2)
    assert len(fixed._regimes.sessions) == 1 and fixed.threads_for(1) == fixed.threads_for(10_000) == 2


class _TimedSession:
    """A session whose call of n rows takes ``base + per_row * n`` us on a fake clock."""

    def __init__(self, clock, threads, base, per_row):
        self.clock, self.threads, self.base, self.per_row = clock, threads, base, per_row

    def run(self, outputs, feeds):
        self.clock[0] += (self.base + self.per_row * len(next(iter(feeds.values())))) * 1e-6

    def get_session_options(self):
        if self.threads is None:
            return ort.SessionOptions()  # intra_op_num_threads 0: onnxruntime's default
        return type("Options", (), {"intra_op_num_threads": self.threads})


@pytest.mark.parametrize("base,per_row,switch", [(10.0, 2.0, 50), (10.0, 0.5, 200), (40.0, 30.0, 3),
                                                 (150.0, 1.0, 1)])
def test_the_switch_is_where_one_thread_needs_100_us(monkeypatch, base, per_row, switch):
    """Calibration on a decoder of known timings: the slope between 1 and 33 rows is the time per
    row, and the switch sits at PARALLEL_ABOVE_US of it (a call of one row above that: at once)."""
    from fastvae.export import thread_regimes

    clock = [0.0]
    monkeypatch.setattr(thread_regimes.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(thread_regimes.os, "cpu_count", lambda: 4)
    monkeypatch.setattr("fastvae.config.usable_cpus", lambda: 4)
    regimes = thread_regimes.ThreadRegimes(lambda threads: _TimedSession(clock, threads, base, per_row),
                                           (LATENT,), "z", "x")
    assert regimes.parallel_from == switch and len(regimes.sessions) == 2
    if switch > 1:
        assert regimes.per_row_us == pytest.approx(per_row)
        assert regimes.threads_for(switch - 1) == 1
    assert regimes.threads_for(switch) is None and regimes.threads_for(10 ** 6) is None


def test_the_parallel_session_takes_the_cpus_this_process_may_use(monkeypatch):
    """Under taskset or a CPU quota (fewer CPUs than the machine's) the all-cores session got
    onnxruntime's default, which counts the machine's cores; with one CPU there is no second."""
    from fastvae.export import thread_regimes

    clock = [0.0]
    monkeypatch.setattr(thread_regimes.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(thread_regimes.os, "cpu_count", lambda: 8)
    for usable, threads in ((8, [1, None]), (3, [1, 3]), (1, [1])):
        monkeypatch.setattr("fastvae.config.usable_cpus", lambda: usable)
        made = []
        thread_regimes.ThreadRegimes(lambda t: made.append(t) or _TimedSession(clock, t, 10.0, 2.0), (LATENT,), "z", "x")
        assert made == threads, (usable, made)


@pytest.mark.parametrize("n,batch_size", [(1, 1000), (40, 1000), (300, 1000), (2500, 1000), (301, 7)])
def test_decode_matches_torch_in_every_regime_and_chunking(decoder, n, batch_size):
    model, path = decoder
    sampler = OnnxSampler(path)
    z = np.random.default_rng(n).standard_normal((n, LATENT), dtype=np.float32)
    got = sampler.decode(z, batch_size=batch_size)
    assert got.shape == (n, *SHAPE) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, _torch_means(model, z).reshape(got.shape), rtol=1e-4, atol=1e-5)
    # non-contiguous float64 input: converted once, same numbers
    np.testing.assert_allclose(sampler.decode(np.asfortranarray(z.astype(np.float64)), batch_size), got,
                               rtol=0, atol=1e-6)


def test_same_seed_same_samples_across_regimes(decoder):
    _, path = decoder
    tuned, one, two = OnnxSampler(path), OnnxSampler(path, threads=1), OnnxSampler(path, threads=2)
    reference = one.sample(3000, seed=5, batch_size=1)
    for sampler in (tuned, one, two):
        for batch_size in (1, 9, 64, 1000):
            np.testing.assert_allclose(sampler.sample(3000, seed=5, batch_size=batch_size), reference,
                                       rtol=0, atol=1e-6)


def test_decode_on_device_keeps_the_result_in_an_ortvalue(decoder):
    model, path = decoder
    sampler = OnnxSampler(path)
    z = np.random.default_rng(1).standard_normal((17, LATENT), dtype=np.float32)
    out = sampler.decode_on_device(z)
    assert isinstance(out, ort.OrtValue) and out.device_name() == "cpu" and out.shape() == [17, *SHAPE]
    np.testing.assert_allclose(out.numpy(), _torch_means(model, z).reshape(17, *SHAPE), rtol=1e-4, atol=1e-5)
    again = sampler.decode_on_device(ort.OrtValue.ortvalue_from_numpy(z))  # an OrtValue goes in as it is
    np.testing.assert_array_equal(again.numpy(), out.numpy())
    with pytest.raises(FastVAEError, match=r"shape \(n, 6\)"):
        sampler.decode_on_device(np.zeros((2, 5), np.float32))
    # decode's dtype rules: real numbers are converted, anything else gets decode's error
    for other in (z.astype(np.float64), np.asfortranarray(z)):  # another dtype, not C-contiguous
        np.testing.assert_array_equal(sampler.decode_on_device(other).numpy(), out.numpy())
    for bad, words in ((z.astype(str), "must hold numbers"), (z.astype(np.complex64), "real numbers")):
        with pytest.raises(FastVAEError, match=words):
            sampler.decode(bad)
        with pytest.raises(FastVAEError, match=words):
            sampler.decode_on_device(bad)
    with pytest.raises(FastVAEError, match=r"float32 OrtValue, got tensor\(float16\)"):
        sampler.decode_on_device(ort.OrtValue.ortvalue_from_numpy(z.astype(np.float16)))


# -- execution providers ----------------------------------------------------------------------
def test_provider_used_is_reported(decoder):
    _, path = decoder
    sampler = OnnxSampler(path, providers=["cpu"])
    assert sampler.provider == "CPUExecutionProvider" and "provider='cpu'" in repr(sampler)
    assert OnnxSampler(path, providers="CPUExecutionProvider").provider == "CPUExecutionProvider"


def test_resolve_orders_providers_with_cpu_last(monkeypatch):
    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: have)
    assert providers.resolve(["cpu", "cuda"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers.resolve(["tensorrt", "cuda"]) == have
    assert providers.resolve(None) == ["CPUExecutionProvider"]
    assert providers.device_type("CUDAExecutionProvider") == "cuda" and providers.device_type("CPUExecutionProvider") == "cpu"


def test_missing_or_unknown_provider_is_one_clear_line(decoder, monkeypatch):
    _, path = decoder
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for name, message in (("cuda", "'cuda' is not available"), ("openvino", "'openvino' is not available"),
                          ("gpu", "unknown execution provider 'gpu'")):
        with pytest.raises(FastVAEError, match=message) as info:
            OnnxSampler(path, providers=[name])
        assert "available" in str(info.value) and "cpu" in str(info.value) and "\n" not in str(info.value)


def test_cli_provider_flag(decoder, tmp_path, capsys, monkeypatch):
    from fastvae.cli import main

    _, path = decoder
    assert main(["sample", str(path), "-n", "4", "--out", str(tmp_path / "s.npy"), "--provider", "cpu"]) == 0
    assert "(cpu provider)" in capsys.readouterr().out
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert main(["sample", str(path), "-n", "4", "--out", str(tmp_path / "t.npy"), "--provider", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'tensorrt' is not available" in err[0] and not (tmp_path / "t.npy").exists()


# -- fastvae bench-sampler ----------------------------------------------------------------------
def test_bench_sampler_prints_latency_per_batch_size(decoder, capsys):
    from fastvae.cli import main

    _, path = decoder
    assert main(["bench-sampler", str(path), "--batch-sizes", "1,64", "--seconds", "0.05", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "provider cpu" in out[1]
    report = json.loads(out[-1])
    assert [r["batch"] for r in report["results"]] == [1, 64] and report["provider"] == "cpu"
    for row in report["results"]:
        assert 0 < row["p50_us"] <= row["p99_us"] and row["calls"] >= 20
        assert row["samples_per_s"] > 0
    table = [line.split() for line in out if line.split() and line.split()[0] in ("1", "64")]
    assert len(table) == 2 and table[0][1] == "1"  # batch 1 runs on one thread


@pytest.mark.parametrize("flags,message", [(["--batch-sizes", "1,x"], "--batch-sizes"),
                                           (["--batch-sizes", "0"], "--batch-sizes"),
                                           (["--seconds", "0"], "--seconds"),
                                           (["--provider", "coreml"], "coreml")])
def test_bench_sampler_bad_flags(decoder, capsys, flags, message, monkeypatch):
    from fastvae.cli import main

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert main(["bench-sampler", str(decoder[1]), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_latency_percentiles():
    from fastvae.export.latency import measure, percentile

    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0 and percentile(values, 1.0) == 100.0
    calls = []
    stats = measure(lambda: calls.append(1), 3, seconds=0.0, min_calls=25, warmup=2)
    assert stats.calls == 25 and len(calls) == 27 and stats.items == 3 and stats.p50 <= stats.p99
