"""benchmarks/reparam_kl_device.py and its rendering: the JSON keeps its documented schema.

The CPU smoke run measures the host path for real (tiny, few calls); the GPU side of the
rendering and of ``report.py store`` is checked on a synthetic record set.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
RECORD_KEYS = {"B", "D", "dtype", "impl", "pass", "device_us", "host_us", "e2e_us", "bytes",
               "kernel_bytes", "copy_gbps", "frac_of_copy", "kernel_frac_of_copy"}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"fastvae_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = _load("report")


def test_cpu_smoke_run_writes_the_schema(tmp_path):
    bench = _load("reparam_kl_device")
    out = tmp_path / "reparam_kl_device.json"
    assert bench.main([str(out), "--smoke", "--cpu"]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"cpu", "torch", "triton", "date", "commit", "smoke", "complete", "calls", "rounds",
                         "replays", "records", "host_floor", "machine"}
    assert data["machine"]["device_type"] == "cpu" and "git_dirty" in data["machine"] and "env" in data["machine"]
    assert data["smoke"] is True and data["complete"] is True and (data["calls"], data["rounds"]) == (20, 2)
    assert {(f["impl"], f["pass"]) for f in data["host_floor"]} == {
        (i, "fwd_bwd") for i in ("function-outputs-only", "fused-int-seed")}
    assert all(f["host_us"] > 0 for f in data["host_floor"])
    records = data["records"]
    assert {(r["impl"], r["pass"]) for r in records} == {
        (i, p) for i in ("fused", "eager") for p in ("fwd", "fwd_bwd")}
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["host_us"] > 0 and r["device_us"] is None and r["copy_gbps"] is None
        assert r["bytes"] == (3 if r["pass"] == "fwd" else 6) * r["B"] * r["D"] * 4 + (
            4 if r["pass"] == "fwd" else 8) * r["B"]
        # the kernels' own traffic: the backward re-reads mu and logvar
        assert r["kernel_bytes"] == (3 if r["pass"] == "fwd" else 8) * r["B"] * r["D"] * 4 + (
            4 if r["pass"] == "fwd" else 8) * r["B"]
        assert r["kernel_frac_of_copy"] is None


def _gpu_result(tmp_path):
    records = []
    for impl, dev, host in (("fused", 60.0, 20.0), ("eager", 300.0, 120.0), ("compile", 90.0, 60.0)):
        records.append({"B": 65536, "D": 256, "dtype": "bf16", "impl": impl, "pass": "fwd_bwd",
                        "device_us": dev, "host_us": host, "e2e_us": dev + host,
                        "bytes": 201850880, "copy_gbps": 4000.0,
                        "frac_of_copy": 201850880 / (dev * 1e-6) / 1e9 / 4000.0})
    data = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
            "date": "2026-12-01T00:00:00+00:00", "commit": "0123456789abcdef", "records": records}
    src = tmp_path / "out"
    src.mkdir()
    (src / "reparam_kl_device.json").write_text(json.dumps(data))
    return src


def test_render_device_table_and_chart(tmp_path):
    src = _gpu_result(tmp_path)
    md, _ = report.render(src)
    text = md.read_text()
    assert text.startswith("# Benchmark results: NVIDIA H200") and "## reparam_kl_device" in text
    fused = next(line for line in text.splitlines() if "| fused |" in line)
    # 201850880 bytes in 60 us = 3.36 TB/s, 84.1 % of a 4 TB/s copy; device time 5x eager's,
    # 1.5x compile's; end to end (host + device) eager 420 us / fused 80 us
    assert "| 60 µs | 84.1 % | 5.00× | 1.50× | 20 µs | 80 µs | 5.25× |" in fused
    png = src / "reparam_kl_device.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_store_files_a_device_time_run_alone(tmp_path):
    src = _gpu_result(tmp_path)
    results = tmp_path / "results"
    assert report.main(["store", str(src), "--results", str(results)]) == 0
    dest = results / "nvidia-h200"
    assert (dest / "reparam_kl_device.json").is_file() and (dest / "README.md").is_file()
    assert "## reparam_kl_device" in (dest / "README.md").read_text()


@pytest.mark.parametrize("mode,units", [("fwd", 3), ("fwd_bwd", 6)])
def test_bytes_count_each_tensor_once(mode, units):
    sys.path.insert(0, str(BENCH))
    from common import reparam_kl_bytes

    assert reparam_kl_bytes(10, 8, 2, mode) == units * 10 * 8 * 2 + (4 if mode == "fwd" else 8) * 10


def test_gpu_record_carries_both_byte_counts():
    bench = _load("reparam_kl_device")
    B, D = 65536, 256
    r = bench.record(B, D, "bf16", "fused", "fwd_bwd", host_us=20.0, device_us=60.0, e2e_us=80.0,
                     nbytes=6 * B * D * 2 + 8 * B, kernel_nbytes=8 * B * D * 2 + 8 * B, copy=4000.0)
    assert set(r) == RECORD_KEYS
    assert r["kernel_frac_of_copy"] / r["frac_of_copy"] == pytest.approx(r["kernel_bytes"] / r["bytes"], rel=1e-3)


def test_render_shows_kernel_traffic_smoke_and_partial(tmp_path):
    src = _gpu_result(tmp_path)
    path = src / "reparam_kl_device.json"
    data = json.loads(path.read_text())
    for r in data["records"]:
        r["kernel_bytes"] = 268959744
        r["kernel_frac_of_copy"] = r["kernel_bytes"] / (r["device_us"] * 1e-6) / 1e9 / 4000.0
    data.update(smoke=False, complete=False, stopped_before="B=262144 D=64")
    path.write_text(json.dumps(data))
    text = report.render(src)[0].read_text()
    assert "% of copy (kernel traffic)" in text and "Partial" in text and "B=262144 D=64" in text
    fused = next(line for line in text.splitlines() if "| fused |" in line)
    assert "| 60 µs | 84.1 % | 112 % | 5.00× |" in fused
    assert "Smoke run" not in text
    data["smoke"] = True
    path.write_text(json.dumps(data))
    assert "Smoke run" in report.render(src)[0].read_text()


def test_compile_keeps_only_the_batch_dynamic(monkeypatch):
    import torch

    bench = _load("reparam_kl_device")
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    bench.make_op("compile")
    bench.make_op("compile", dynamic="all")
    assert seen == [{"dynamic": False}, {"dynamic": True}]  # default: D specialised, B marked
    marked = []
    monkeypatch.setattr(torch._dynamo, "mark_dynamic", lambda t, dim: marked.append(dim))
    bench.mark_batch_dynamic(torch.zeros(2, 3), torch.zeros(2, 3))
    assert marked == [0, 0]


def test_wall_clock_suite_draws_the_seed_per_call_and_marks_host_bound(monkeypatch):
    sys.path.insert(0, str(BENCH))
    suite = _load("test_bench_reparam_kl")
    seen = {}
    monkeypatch.setattr(suite, "reparameterize_kl", lambda mu, logvar, **kw: seen.update(kw))
    suite.fused(None, None)
    assert seen == {"seed": None}
    suite._per_call.clear()
    small = {"bandwidth_fraction": 0.1, "bandwidth_fraction_of_copy": 0.1}
    large = {"bandwidth_fraction": 0.4, "bandwidth_fraction_of_copy": 0.4}
    suite.mark_host_bound(("fused", "fwd_bwd", 256, "bf16"), 65536, 900e-6, large)
    suite.mark_host_bound(("fused", "fwd_bwd", 256, "bf16"), 4096, 800e-6, small)  # 16x bytes, 1.1x time
    assert large["host_bound"] is True and small["host_bound"] is True
    assert "bandwidth_fraction" not in large and "bandwidth_fraction_of_copy" not in small
    grows = {"bandwidth_fraction": 0.5}
    suite.mark_host_bound(("fused", "fwd", 256, "bf16"), 4096, 50e-6, {})
    suite.mark_host_bound(("fused", "fwd", 256, "bf16"), 65536, 400e-6, grows)
    assert grows == {"bandwidth_fraction": 0.5, "host_bound": False}


def test_gpu_host_time_alternates_between_implementations():
    """Host and e2e times of fused, eager and compile come from rounds that alternate between
    them (a ratio measured side by side), each round framed by a device sync."""
    bench = _load("reparam_kl_device")
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("fused", "eager")}
    syncs = []
    times = bench.host_e2e_us(fns, calls=3, rounds=2, sync=lambda: syncs.append(len(order)))
    assert set(times) == {"fused", "eager"}
    assert all(host > 0 and e2e >= host for host, e2e in times.values())
    warm = ["fused", "eager"]
    assert order == warm + (["fused"] * 3 + ["eager"] * 3) * 2
    # before and after each timed batch of calls
    assert syncs == [2, 5, 5, 8, 8, 11, 11, 14]


def test_gpu_shape_records_every_implementation_on_shared_inputs(monkeypatch):
    """The GPU path's bookkeeping, run on the CPU with the CUDA timers replaced: one record per
    implementation, device time from its own graph, host/e2e from the alternating rounds."""
    import torch

    bench = _load("reparam_kl_device")
    made, make_inputs = [], bench.make_inputs

    def inputs(B, D, dtype, device, grad):
        made.append((B, D, dtype, grad))
        return make_inputs(B, D, dtype, "cpu", grad)

    monkeypatch.setattr(bench, "make_inputs", inputs)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (2**40, 2**40))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch, "tensor", lambda *a, device=None, **kw: torch.as_tensor(*a, **kw))
    devices = iter([10.0, 70.0])
    monkeypatch.setattr(bench, "graph_device_us", lambda fn, flush, replays: (fn(), next(devices))[1])
    monkeypatch.setattr(bench, "host_e2e_us", lambda fns, rounds: {
        k: (5.0 * (i + 1), 20.0 * (i + 1)) for i, k in enumerate(fns)})
    monkeypatch.setattr(bench, "copy_gbps", lambda nbytes, flush, replays: 1000.0)
    ops = {"fused": bench.make_op("fused"), "eager": bench.make_op("eager")}
    records = bench.gpu_shape(8, 64, "fp32", "fwd_bwd", ["fused", "eager"], ops, None, 3)
    assert made == [(8, 64, torch.float32, True)]  # one set of inputs for both
    assert [(r["impl"], r["device_us"], r["host_us"], r["e2e_us"]) for r in records] == [
        ("fused", 10.0, 5.0, 20.0), ("eager", 70.0, 10.0, 40.0)]
    assert all(set(r) == RECORD_KEYS and r["pass"] == "fwd_bwd" for r in records)
