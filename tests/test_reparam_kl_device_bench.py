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
               "copy_gbps", "frac_of_copy"}


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
    assert set(data) == {"cpu", "torch", "triton", "date", "commit", "records", "host_floor"}
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
