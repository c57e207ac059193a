"""The benchmark suites cannot rot: run them once in smoke mode, and test the report tooling.

``test_benchmark_suites_run_in_smoke_mode`` runs ``pytest benchmarks --benchmark-disable`` with
``FASTVAE_BENCH_SMOKE=1`` (tiny sizes, each benchmark body called once). The other tests check
``benchmarks/report.py`` (tables, chart, regression report) and ``benchmarks/common.py`` on
synthetic pytest-benchmark JSON, so they pass before any suite exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


report = _load("fastvae_bench_report", BENCH / "report.py")


# --------------------------------------------------------------------------- smoke run


def test_benchmark_suites_run_in_smoke_mode(tmp_path):
    suites = sorted(BENCH.glob("test_bench_*.py"))
    if not suites:
        pytest.skip("no benchmark suites yet")
    extra = tmp_path / "extra_info.jsonl"
    # from the repository root, whose fastvae/ comes first on sys.path: it must find
    # fastvae.kernels and fastvae.export by itself, as in benchmarks/gpu/run.sh (no install)
    cmd = [sys.executable, "-m", "pytest", str(BENCH), "--benchmark-disable", "-q",
           "-p", "no:cacheprovider", "--timeout=90", "-rs"]
    proc = subprocess.run(cmd, cwd=REPO, env=_bench_env(FASTVAE_BENCH_EXTRA_INFO=str(extra)),
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"smoke run of {[s.name for s in suites]} failed:\n{out[-6000:]}"
    assert "passed" in out
    recorded = [json.loads(line) for line in extra.read_text().splitlines()]
    # the GPU headline's fair arms run (tiny, on the CPU), and record their ratios
    (train,) = [r["extra_info"] for r in recorded if "test_bench_train.py::test_gpu_trainer_vs_plain" in r["test"]]
    for key in ("speedup", "speedup_vs_plain_deferred_read", "speedup_vs_plain_compile_fused_adam",
                "per_step_read_cost"):
        assert train[key] > 0, key
    assert train["plain_read_every"] == 32
    # the loader benchmark's two sides read the same images, on the CPU
    loaders = {r["extra_info"]["impl"]: r["extra_info"] for r in recorded if "::test_loader_" in r["test"]}
    assert loaders["imagefolder"]["items"] == loaders["shards"]["items"]
    assert loaders["imagefolder"]["device"] == loaders["shards"]["device"] == "cpu"


def test_every_suite_reads_the_smoke_switch_through_common():
    """One parser for FASTVAE_BENCH_SMOKE (common.smoke_mode), so "0" and "false" mean off."""
    for path in [*BENCH.glob("test_bench_*.py"), *BENCH.glob("gpu/*.py")]:
        assert not re.search(r"environ\S*\(?.FASTVAE_BENCH_SMOKE", path.read_text()), path.name


# --------------------------------------------------------------------------- synthetic JSON


def _bench(name, group, median, *, impl, baseline=False, case=None, **extra):
    info = {"impl": impl, "baseline": baseline, **extra}
    if case is not None:
        info["case"] = case
    return {
        "group": group,
        "name": name,
        "fullname": f"benchmarks/test_bench_demo.py::{name}",
        "params": None,
        "param": None,
        "extra_info": info,
        "options": {},
        "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median * 1.02,
                  "stddev": median * 0.05, "rounds": 10, "median": median, "iqr": 0.0,
                  "q1": median, "q3": median, "iqr_outliers": 0, "stddev_outliers": 0,
                  "outliers": "0;0", "ld15iqr": median, "hd15iqr": median, "ops": 1 / median,
                  "total": median * 10, "iterations": 1},
    }


def _run_json(benchmarks, device="Test GPU 80GB", commit="0123456789abcdef0123456789abcdef01234567"):
    return {
        "machine_info": {
            "node": "test", "python_version": "3.12.0", "device": device,
            "fastvae": {"device": device, "device_type": "cuda", "torch": "2.11.0",
                        "triton": "3.6.0", "onnxruntime": "1.30.0", "python": "3.12.0",
                        "date": "2026-11-27T12:00:00+00:00", "git_commit": commit,
                        "git_dirty": False, "smoke": False},
        },
        "commit_info": {"id": commit, "dirty": False},
        "benchmarks": benchmarks,
        "datetime": "2026-11-27T12:00:00+00:00",
        "version": "5.3.1",
    }


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


SYNTH = [
    _bench("test_eager[B=64]", "reparam_kl", 4e-6, impl="eager", baseline=True, case="B=64",
           throughput=1.6e7),
    _bench("test_fused[B=64]", "reparam_kl", 2e-6, impl="fused", case="B=64", throughput=3.2e7,
           bandwidth_GBps=1500.0, bandwidth_fraction=0.45, peak_memory_MB=12.5),
    _bench("test_eager[B=4096]", "reparam_kl", 40e-6, impl="eager", baseline=True, case="B=4096"),
    _bench("test_fused[B=4096]", "reparam_kl", 10e-6, impl="fused", case="B=4096"),
    _bench("test_nobase", "lonely", 1e-3, impl="x"),
]


def test_rows_and_speedups(tmp_path):
    run = report.load_run(_write(tmp_path / "reparam_kl.json", _run_json(SYNTH)))
    assert run.suite == "reparam_kl"
    by_name = {r.name: r for r in run.rows}
    assert by_name["test_fused[B=64]"].speedup == pytest.approx(2.0)
    assert by_name["test_fused[B=4096]"].speedup == pytest.approx(4.0)  # same case only
    assert by_name["test_eager[B=64]"].speedup == pytest.approx(1.0)
    assert by_name["test_nobase"].speedup is None


def test_render_writes_table_and_chart(tmp_path):
    folder = tmp_path / "results" / "test-gpu"
    _write(folder / "reparam_kl.json", _run_json(SYNTH))
    _write(folder / "sampling.json", _run_json([
        _bench("test_torch", "sampling", 2e-3, impl="torch", baseline=True),
        _bench("test_ort", "sampling", 1e-3, impl="onnxruntime"),
    ]))
    _write(folder / "train.json", _run_json([
        _bench("test_interleaved", "train-interleaved", 0.3, impl="fastvae+plain", speedup=1.625,
               per_step_read_cost=1.2),
    ]))
    (folder / "notes.json").write_text("[1, 2]")  # not a benchmark file: skipped
    # run as a script, the way run_suites.sh calls it
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), "render", str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (folder / "README.md").read_text()
    assert "# Benchmark results: Test GPU 80GB" in md
    assert "- torch: 2.11.0" in md and "- triton: 3.6.0" in md and "0123456789ab" in md
    assert "## reparam_kl" in md and "## sampling" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    fused64 = next(line for line in rows if "`test_fused[B=64]`" in line)
    assert "2.00×" in fused64 and "B=64" in fused64 and "2 µs" in fused64
    assert "| 1500 |" in fused64 and "| 45 % |" in fused64 and "| 12.5 |" in fused64
    assert "| 32 M |" in fused64  # throughput
    assert "4.00×" in next(line for line in rows if "`test_fused[B=4096]`" in line)
    assert "1 (baseline)" in next(line for line in rows if "`test_eager[B=64]`" in line)
    assert "2.00×" in next(line for line in rows if "`test_ort`" in line)
    interleaved = next(line for line in rows if "`test_interleaved`" in line)
    assert "| speedup 1.62×, per-step-read cost 1.20× |" in interleaved  # measured in the call
    assert "![speedups](ratios.png)" in md
    png = folder / "ratios.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_chart_draws_every_ratio_the_summary_shows(tmp_path):
    """The chart's bars: speedups over a baseline, speedups measured in one run, and a time
    ratio (lower is faster) drawn as its inverse, so every bar reads "higher is faster"."""
    _write(tmp_path / "train.json", _run_json([
        _bench("test_torch", "g", 2e-3, impl="torch", baseline=True),
        _bench("test_ort", "g", 1e-3, impl="onnxruntime"),
        _bench("test_interleaved", "i", 0.3, impl="fastvae+plain", speedup=1.5, time_ratio=0.8,
               per_step_read_cost=1.2),  # a cost: a table cell, not a bar
    ]))
    (run,) = report.load_dir(tmp_path)
    bars = dict(report.chart_bars(run))
    assert bars == pytest.approx({"g: onnxruntime vs torch": 2.0,
                                  "i: fastvae+plain: speedup (one run)": 1.5,
                                  "i: fastvae+plain: 1 / time ratio (one run)": 1.25})
    summary_values = sorted(entry.value for entry in report.ratio_entries(run))
    assert summary_values == pytest.approx([0.8, 1.5, 2.0])  # the summary keeps the time ratio as is


def test_render_empty_folder(tmp_path):
    md, png = report.render(tmp_path)
    assert "no results" in md.read_text()
    assert png.exists()


def test_compare_takes_an_interleaved_benchmark_arm_by_arm(tmp_path, capsys):
    """A round of an interleaved benchmark sums its arms: an arm added read as +60-100 %
    SLOWER, and one arm 30 % slower among five as under the threshold."""
    arms = {"plain": 1.0, "fastvae": 0.5, "compiled": 0.7, "deferred": 0.9, "each_step": 0.6}

    def one(arm_times):
        bench = _bench("test_interleaved", "x", sum(arm_times.values()), impl="fastvae+plain")
        bench["extra_info"]["arm_medians_s"] = arm_times
        return _run_json([bench])

    old = _write(tmp_path / "old" / "train.json", one({k: arms[k] for k in ("plain", "fastvae", "compiled")}))
    slower_arm = {**arms, "fastvae": 0.65}  # 30 % slower; two arms added
    new = _write(tmp_path / "new" / "train.json", one(slower_arm))
    assert report.main(["compare", str(old), str(new), "--fail"]) == 1
    out = capsys.readouterr().out
    slower = [line for line in out.splitlines() if line.startswith("SLOWER")]
    assert len(slower) == 1 and "test_interleaved[fastvae]" in slower[0] and "+30.0%" in slower[0], out
    assert "NEW     train::test_interleaved[deferred]" in out and "NEW     train::test_interleaved[each_step]" in out
    legacy = _run_json([_bench("test_interleaved", "x", 2.2, impl="fastvae+plain")])  # stored before the arms
    assert report.main(["compare", str(_write(tmp_path / "legacy.json", legacy)), str(new), "--fail"]) == 0
    assert "not compared" in capsys.readouterr().out


def test_compare_reports_the_slower_benchmark(tmp_path, capsys):
    old = _write(tmp_path / "old" / "reparam_kl.json", _run_json(SYNTH))
    new_benches = json.loads(json.dumps(SYNTH))
    new_benches[1]["stats"]["median"] *= 1.30  # fused B=64: 30 % slower -> regression
    new_benches[3]["stats"]["median"] *= 1.05  # fused B=4096: 5 % slower -> within threshold
    new_benches[0]["stats"]["median"] *= 0.5   # eager B=64: faster
    del new_benches[4]                         # gone
    new_benches.append(_bench("test_new", "lonely", 1e-3, impl="y"))
    new = _write(tmp_path / "new" / "reparam_kl.json", _run_json(new_benches))

    rc = report.main(["compare", str(old), str(new), "--threshold", "0.1", "--fail"])
    out = capsys.readouterr().out
    assert rc == 1
    slower = [line for line in out.splitlines() if line.startswith("SLOWER")]
    assert len(slower) == 1 and "test_fused[B=64]" in slower[0] and "+30.0%" in slower[0]
    assert any(line.startswith("FASTER") and "test_eager[B=64]" in line for line in out.splitlines())
    assert "GONE    reparam_kl::test_nobase" in out and "NEW     reparam_kl::test_new" in out
    assert "1 benchmark(s) slower" in out

    # folders: suites are matched by file name; without --fail the exit status stays 0
    assert report.main(["compare", str(old.parent), str(new.parent)]) == 0
    assert "SLOWER  reparam_kl::test_fused[B=64]" in capsys.readouterr().out
    # a looser threshold lets the 30 % through
    assert report.main(["compare", str(old), str(new), "--threshold", "0.5", "--fail"]) == 0
    # nothing stored yet: nothing to compare, not an error
    assert report.main(["compare", str(tmp_path / "missing.json"), str(new), "--fail"]) == 0


def test_summary_and_readme_markers(tmp_path):
    a = tmp_path / "gpu-a"
    _write(a / "reparam_kl.json", _run_json(SYNTH, device="GPU A"))
    text = report.summary([a])
    assert "| reparam_kl | reparam_kl | B=64 | fused vs eager | 2.00× |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.BEGIN_MARK}\nold\n{report.END_MARK}\ntail\n")
    assert report.main(["summary", str(a), "--readme", str(readme)]) == 0
    content = readme.read_text()
    assert "old" not in content and "fused vs eager" in content and content.endswith("tail\n")


def test_summary_shows_ratios_measured_in_one_run_and_marks_cpu_benchmarks_on_a_gpu_host(tmp_path):
    """The summary left out the interleaved benchmarks' own ratios (the headline figures) and
    showed a CPU-side suite run on a GPU host under the GPU's name, unmarked."""
    gpu = tmp_path / "gpu"
    _write(gpu / "train.json", _run_json([_bench("test_interleaved", "train-interleaved", 0.3, impl="fastvae+plain",
                                                 speedup=1.625)]))
    _write(gpu / "latency.json", _run_json([_bench("test_ort", "latency", 1e-3, impl="ort", device="cpu"),
                                            _bench("test_torch", "latency", 2e-3, impl="torch", baseline=True,
                                                   device="cpu")]))
    text = report.summary([gpu])
    assert "| train | train-interleaved | — | fastvae+plain: speedup (measured in one run) | 1.62× |" in text, text
    assert "| latency | latency | — | ort vs torch | 2.00× (cpu) |" in text, text


def test_store_files_a_foreign_run(tmp_path, capsys):
    src = tmp_path / "out"
    data = _run_json(SYNTH)
    data["machine_info"]["fastvae"]["slug"] = "test-gpu-80gb"
    _write(src / "reparam_kl.json", data)
    (src / "run.log").write_text("log")
    (src / "precision.json").write_text('{"precisions": {}}')
    (src / "unrelated.txt").write_text("x")
    results = tmp_path / "results"
    assert report.main(["store", str(src), "--results", str(results)]) == 0
    dest = results / "test-gpu-80gb"
    assert (dest / "reparam_kl.json").exists() and (dest / "README.md").exists()
    assert (dest / "run.log").read_text() == "log" and (dest / "precision.json").exists()
    assert not (dest / "unrelated.txt").exists()
    slower = json.loads(json.dumps(data))
    slower["benchmarks"][1]["stats"]["median"] *= 2
    _write(src / "reparam_kl.json", slower)
    capsys.readouterr()
    assert report.main(["store", str(src), "--results", str(results)]) == 0
    assert "SLOWER  reparam_kl::test_fused[B=64]" in capsys.readouterr().out
    assert report.main(["store", str(tmp_path / "empty"), "--results", str(results)]) == 1
    smoke = json.loads(json.dumps(data))
    smoke["machine_info"]["fastvae"]["smoke"] = True
    _write(src / "reparam_kl.json", smoke)
    assert report.main(["store", str(src), "--results", str(results)]) == 1  # refused


def test_store_unpacks_run_sh_archive_and_keeps_runs_without_suites(tmp_path):
    """On a GPU machine run.sh packs its outputs (the device tool returns 8 files at most); a
    run of GPU tests or extras alone has no suite JSON but its log and extras are kept."""
    import tarfile

    run = tmp_path / "run"
    _write(run / "tile_sweep.json", {"info": {"slug": "test-gpu"}, "smoke": False, "rows": []})
    (run / "run.log").write_text("tests: 61 passed")
    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(out / report.PACKED, "w:gz") as archive:
        for path in run.iterdir():
            archive.add(path, arcname=path.name)
    results = tmp_path / "results"
    assert report.main(["store", str(out), "--results", str(results)]) == 0
    dest = results / "test-gpu"
    assert (dest / "run.log").read_text() == "tests: 61 passed" and (dest / "tile_sweep.json").is_file()
    assert [p.read_text() for p in dest.glob("run-*.log")] == ["tests: 61 passed"]
    _write(run / "tile_sweep.json", {"info": {"slug": "test-gpu"}, "smoke": True, "rows": []})
    assert report.main(["store", str(run), "--results", str(results)]) == 1  # a smoke sweep: refused
    tests_only = tmp_path / "tests_only"  # GPU tests alone: the log, and the machine it ran on
    _write(tests_only / "machine.json", {"slug": "other-gpu", "device": "Other GPU"})
    (tests_only / "run.log").write_text("61 passed")
    assert report.main(["store", str(tests_only), "--results", str(results)]) == 0
    assert (results / "other-gpu" / "run.log").read_text() == "61 passed"


def test_store_keeps_each_runs_log_stamped_by_its_own_start(tmp_path):
    """Two runs stored one after the other (two device calls of one session) keep both logs,
    each named by the start its first line gives, whenever they are stored."""
    results = tmp_path / "results"
    starts = ("2026-11-30T21:02:22Z", "2026-11-30T21:06:28Z")
    for i, start in enumerate(starts):
        run = tmp_path / f"run{i}"
        _write(run / "machine.json", {"slug": "test-gpu", "device": "Test GPU"})
        (run / "run.log").write_text(f"fastvae GPU run: repo /r, budget 540s, date {start}\nrun {i}\n")
        assert report.main(["store", str(run), "--results", str(results)]) == 0
    dest = results / "test-gpu"
    assert sorted(p.name for p in dest.glob("run-*.log")) == ["run-2026-11-30T2102Z.log", "run-2026-11-30T2106Z.log"]
    assert (dest / "run-2026-11-30T2102Z.log").read_text().endswith("run 0\n")
    assert (dest / "run.log").read_text().endswith("run 1\n")
    # a different log of the same start minute is kept beside it, not over it
    (tmp_path / "run1" / "run.log").write_text(f"date {starts[1]}\nrun 1 again\n")
    assert report.main(["store", str(tmp_path / "run1"), "--results", str(results)]) == 0
    assert (dest / "run-2026-11-30T2106Z-2.log").read_text().endswith("again\n")


# --------------------------------------------------------------------------- common.py


def test_common_modes_sizes_and_annotate(monkeypatch):
    common = _load("fastvae_bench_common", BENCH / "common.py")
    monkeypatch.setenv("FASTVAE_BENCH_SMOKE", "1")
    assert common.smoke_mode() and common.pick(smoke=1, cpu=2, gpu=3) == 1
    for off in ("0", "false", "False", "no", "off", ""):
        monkeypatch.setenv("FASTVAE_BENCH_SMOKE", off)
        assert not common.smoke_mode(), off
    monkeypatch.setenv("FASTVAE_BENCH_DEVICE", "cpu")
    assert not common.on_gpu() and common.pick(smoke=1, cpu=2, gpu=3) == 2
    assert common.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.slugify("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon-cpu"
    assert common.peak_bandwidth_gbps("NVIDIA H200") == 4800.0
    assert common.peak_bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert common.peak_memory(lambda: None) is None  # CPU

    calls = []
    fn = common.synced(calls.append, 1, repeat=3)
    fn()
    assert calls == [1, 1, 1]

    class Stats:
        median = 0.5

    class Meta:
        stats = Stats()

    class FakeBenchmark:
        extra_info: dict = {}
        stats = Meta()

    bench = FakeBenchmark()
    info = common.annotate(bench, impl="fused", baseline=True, items=1000, bytes_moved=2e9,
                           case="B=8")
    assert info["impl"] == "fused" and info["baseline"] is True and info["case"] == "B=8"
    assert info["throughput"] == pytest.approx(2000.0)
    assert info["bandwidth_GBps"] == pytest.approx(4.0)
    assert "bandwidth_fraction" not in info  # CPU: no peak bandwidth
    bench.stats = None  # --benchmark-disable
    bench.extra_info = {}
    assert "throughput" not in common.annotate(bench, impl="eager", items=10)


def test_device_info_has_versions_and_commit(monkeypatch):
    common = _load("fastvae_bench_common", BENCH / "common.py")
    monkeypatch.setenv("FASTVAE_GIT_COMMIT", "abc123")
    info = common.device_info()
    for key in ("device", "torch", "triton", "onnxruntime", "python", "date", "git_commit"):
        assert key in info
    assert info["git_commit"] == "abc123"
    json.dumps(info)  # serialisable


def test_scripts_parse():
    for script in ("run_suites.sh", "gpu/run.sh", "fetch_wheels.sh", "torch_free_install.sh"):
        proc = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_tile_sweep_runs_interpreted(tmp_path):
    """The GPU run's kernel tile sweep, in its smoke form (Triton interpreter, tiny shape)."""
    out = tmp_path / "tile_sweep.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu" / "tile_sweep.py"), str(out), "--smoke"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report_ = json.loads(out.read_text())
    assert report_["smoke"] and len(report_["results"]) == 4  # 2 kernels x 2 tiles
    assert set(report_["best"]) == {"fwd B=64 D=8 fp32", "bwd B=64 D=8 fp32"}
    assert all(row["ms"] > 0 and row["gain_over_default"] >= 1 for row in report_["best"].values())
    assert "torch" in report_["info"]


# --------------------------------------------------------------------------- review fixes (2026-11-30)


def _common():
    return _load("fastvae_bench_common", BENCH / "common.py")


def _cpu_records(n):
    return [{"B": 8, "D": 64 * (i + 1), "dtype": "fp32", "impl": "fused", "pass": "fwd", "host_us": 1.0}
            for i in range(n)]


def _smoke_copy(data):
    smoke = json.loads(json.dumps(data))
    smoke["machine_info"]["fastvae"]["smoke"] = True
    smoke["fastvae"] = {"smoke": True}
    return smoke


@pytest.mark.parametrize("name,data", [
    ("reparam_kl_device.json", {"cpu": "x", "smoke": True, "records": _cpu_records(16)}),
    ("reparam_kl_device.json", {"cpu": "x", "records": _cpu_records(4)}),  # older file: no flag, <= 4 records
    ("precision.json", {"epochs": 2, "machine": {"slug": "test-cpu", "smoke": False}, "runs": {}}),  # older file
    ("precision.json", {"epochs": 50, "smoke": True, "machine": {"slug": "test-cpu"}, "runs": {}}),
    ("photo_quality.json", {"smoke": True, "machine": {"slug": "s"}, "models": {}}),
])
def test_store_refuses_smoke_extras(tmp_path, name, data):
    src = tmp_path / "out"
    _write(src / name, data)
    _write(src / "machine.json", {"slug": "test-cpu", "device": "Test CPU"})
    results = tmp_path / "results"
    assert report.main(["store", str(src), "--results", str(results)]) == 1
    assert not (results / "test-cpu" / name).exists()
    assert report.main(["store", str(src), "--results", str(results), "--force"]) == 0


def test_store_keeps_the_fuller_stored_file_and_the_shorter_run_beside_it(tmp_path, capsys):
    """A run cut short (8 device-time records, a partial suite) would have replaced a stored
    file holding more: store refused the whole run then, its other files with it. Now the
    stored file stays, this run's goes into partial/, everything else is stored."""
    src, results = tmp_path / "out", tmp_path / "results"
    dest = results / "test-cpu"
    _write(src / "machine.json", {"slug": "test-cpu", "device": "Test CPU"})
    _write(src / "reparam_kl_device.json", {"cpu": "x", "smoke": False, "records": _cpu_records(16)})
    _write(src / "precision.json", {"epochs": 50, "machine": {"slug": "test-cpu"}, "runs": {"a": {}, "b": {}}})
    assert report.main(["store", str(src), "--results", str(results)]) == 0
    _write(src / "reparam_kl_device.json", {"cpu": "x", "smoke": False, "records": _cpu_records(8)})
    _write(src / "precision.json", {"epochs": 60, "machine": {"slug": "test-cpu"}, "runs": {"a": {}, "b": {}}})
    capsys.readouterr()
    assert report.main(["store", str(src), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "kept the stored reparam_kl_device.json: this run's holds 8 records, the stored one 16" in out
    assert len(json.loads((dest / "reparam_kl_device.json").read_text())["records"]) == 16
    kept, = (dest / "partial").glob("*-reparam_kl_device.json")
    assert len(json.loads(kept.read_text())["records"]) == 8
    assert json.loads((dest / "precision.json").read_text())["epochs"] == 60  # the rest is stored
    assert report.main(["store", str(src), "--results", str(results), "--force"]) == 0
    assert len(json.loads((dest / "reparam_kl_device.json").read_text())["records"]) == 8

    # a partial suite run with fewer benchmarks than the stored one: kept beside it too
    suite = tmp_path / "suite"
    full = _run_json(SYNTH)
    full["machine_info"]["fastvae"]["slug"] = "test-cpu"
    _write(suite / "reparam_kl.json", full)
    assert report.main(["store", str(suite), "--results", str(results)]) == 0
    cut = json.loads(json.dumps(full))
    cut["benchmarks"] = cut["benchmarks"][:2]
    cut["fastvae"] = {"smoke": False, "partial": True, "partial_reason": "interrupted"}
    _write(suite / "reparam_kl.json", cut)
    capsys.readouterr()
    assert report.main(["store", str(suite), "--results", str(results)]) == 0
    assert "is partial (interrupted) with 2 benchmarks" in capsys.readouterr().out
    assert len(json.loads((dest / "reparam_kl.json").read_text())["benchmarks"]) == len(SYNTH)
    assert len(list((dest / "partial").glob("*-reparam_kl.json"))) == 1


def test_smoke_and_partial_marks_in_render_summary_compare(tmp_path, capsys):
    folder = tmp_path / "gpu"
    _write(folder / "a_suite.json", _run_json(SYNTH))
    _write(folder / "reparam_kl.json", _smoke_copy(_run_json(SYNTH)))  # not the first run
    partial = _run_json(SYNTH)
    partial["fastvae"] = {"smoke": False, "partial": True, "partial_reason": "interrupted"}
    _write(folder / "z_suite.json", partial)
    _write(folder / "tile_sweep.json", {"info": {"slug": "g"}, "smoke": False, "complete": False,
                                        "stopped_before": "B=65536 D=64 bf16", "results": []})
    md = report.render(folder)[0].read_text()
    assert "the figures of reparam_kl.json mean nothing" in md
    assert "partial: z_suite.json is incomplete (interrupted)" in md
    assert "partial: tile_sweep.json stopped" in md and "B=65536 D=64 bf16" in md
    text = report.summary([folder])
    assert "smoke: reparam_kl" in text and "partial: z_suite" in text
    assert "| reparam_kl | reparam_kl | B=64 | fused vs eager | 2.00× (smoke) |" in text
    assert "| a_suite | reparam_kl | B=64 | fused vs eager | 2.00× |" in text
    other = tmp_path / "other"
    _write(other / "reparam_kl.json", _run_json(SYNTH))
    capsys.readouterr()
    report.compare(other / "reparam_kl.json", folder / "reparam_kl.json")
    assert "is a smoke run" in capsys.readouterr().out


def test_compare_folders_skips_non_suite_files(tmp_path, capsys):
    """A stored folder also holds precision.json, footprint.json, reparam_kl_device.json and
    machine.json: compare pairs the suites only (it raised on them before)."""
    for side in ("old", "new"):
        folder = tmp_path / side
        _write(folder / "reparam_kl.json", _run_json(SYNTH))
        _write(folder / "precision.json", {"epochs": 50, "machine": {}, "runs": {}})
        _write(folder / "footprint.json", {"date": "x"})
        _write(folder / "reparam_kl_device.json", {"cpu": "x", "records": []})
        _write(folder / "machine.json", {"slug": "x"})
        _write(folder / "stray.json", [1, 2])
    assert report.main(["compare", str(tmp_path / "old"), str(tmp_path / "new"), "--fail"]) == 0
    assert "0 benchmark(s) slower" in capsys.readouterr().out


def test_device_info_records_timing_env_and_run_sh_unsets_it(monkeypatch):
    common = _common()
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    env = common.device_info()["env"]
    assert set(env) == set(common.TIMING_ENV) >= {"TRITON_INTERPRET", "CUDA_LAUNCH_BLOCKING",
                                                  "TORCH_COMPILE_DEBUG", "PYTORCH_NO_CUDA_MEMORY_CACHING"}
    assert env["CUDA_LAUNCH_BLOCKING"] == "1" and env["TRITON_INTERPRET"] is None
    script = (BENCH / "gpu" / "run.sh").read_text()
    listed = re.search(r"^TIMING_ENV=\(([^)]*)\)", script, re.M).group(1).split()
    assert listed == list(common.TIMING_ENV)
    assert 'unset "$v"' in script and '[ "$has_cuda" = 1 ] && clear_timing_env' in script
    # the no-CUDA branches record their smoke runs as smoke
    assert 'FASTVAE_BENCH_SMOKE=1 timeout -s INT -k 20 "$cap" "$PY" benchmarks/reparam_kl_device.py' in script
    assert 'FASTVAE_BENCH_SMOKE=1 timeout -s INT -k 20 "$cap" "$PY" benchmarks/precision_check.py' in script


def test_clear_timing_env_in_bash(tmp_path):
    """run.sh's clear_timing_env unsets the variables and says so (the function alone)."""
    script = (BENCH / "gpu" / "run.sh").read_text()
    block = script[script.index("TIMING_ENV=("):script.index("\nmain() {")]
    prog = block + '\nexport CUDA_LAUNCH_BLOCKING=1 TRITON_INTERPRET=0\nclear_timing_env\n' \
        'echo "left:${CUDA_LAUNCH_BLOCKING-none}:${TRITON_INTERPRET-none}"\n'
    proc = subprocess.run(["bash", "-c", prog], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "unset CUDA_LAUNCH_BLOCKING (was '1')" in proc.stdout and "left:none:none" in proc.stdout


def test_peak_bandwidth_matches_whole_model_names():
    common = _common()
    assert common.peak_bandwidth_gbps("NVIDIA L4") == 300.0
    assert common.peak_bandwidth_gbps("NVIDIA L40") == 864.0
    assert common.peak_bandwidth_gbps("NVIDIA L40S") == 864.0
    assert common.peak_bandwidth_gbps("NVIDIA GH200 480GB") == 4000.0
    assert common.peak_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0


def test_annotate_labels_the_device_the_work_used():
    common = _common()

    class Bench:
        extra_info: dict = {}
        stats = None

    bench = Bench()
    assert common.annotate(bench, impl="onnxruntime", device="cpu")["device"] == "cpu"
    for path in ("test_bench_sampling.py", "test_bench_serving.py", "isolated_latency.py", "test_bench_latency.py"):
        assert 'device="cpu"' in (BENCH / path).read_text(), path


def test_l2_flush_reads_and_never_writes():
    common = _common()
    flush = common.L2Flush(4096, "cpu")
    version = flush.buf._version
    flush()
    assert flush.buf._version == version  # zero_() would bump it: dirty lines in L2
    assert int(flush.sink) == 0


def test_tile_sweep_median_and_reading_flush(monkeypatch):
    import triton.testing

    sweep = _load("fastvae_bench_tile_sweep", BENCH / "gpu" / "tile_sweep.py")
    seen = {}

    def fake_do_bench(fn, **kwargs):
        seen.update(kwargs)
        return 1.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert sweep.timer(False)(lambda: None) == 1.0 and seen["return_mode"] == "median"

    import torch
    from triton import runtime

    class Driver:
        def clear_cache(self, cache):
            cache.zero_()

    class Config:
        active = Driver()

    monkeypatch.setattr(runtime, "driver", Config())
    cache = torch.ones(64, dtype=torch.int32)
    with sweep.reading_l2_flush() as how:
        version = cache._version
        runtime.driver.active.clear_cache(cache)
        assert how == "read" and cache._version == version and int(cache.sum()) == 64
    runtime.driver.active.clear_cache(cache)  # restored: triton's own
    assert int(cache.sum()) == 0
    # the byte counts are common's: each kernel's own traffic
    assert sweep.traffic_bytes("bwd", 10, 8, 2) == 5 * 10 * 8 * 2 + 4 * 10


def test_tile_sweep_budget_stop_is_marked_partial(tmp_path):
    out = tmp_path / "tile_sweep.json"
    sweep = _load("fastvae_bench_tile_sweep", BENCH / "gpu" / "tile_sweep.py")
    assert sweep.main([str(out), "--smoke", "--budget-s", "-1"]) == 0
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["stopped_before"] == "B=64 D=8 fp32" and data["results"] == []


def test_kernel_bytes_count_the_backward_rereads():
    common = _common()
    B, D, s = 10, 8, 2
    assert common.reparam_kl_bytes(B, D, s, "fwd_bwd") == 6 * B * D * s + 8 * B  # the acceptance count
    assert common.reparam_kl_kernel_bytes(B, D, s, "fwd_bwd") == 8 * B * D * s + 8 * B
    assert common.reparam_kl_kernel_bytes(B, D, s, "fwd") == common.reparam_kl_bytes(B, D, s, "fwd")
    assert (common.reparam_kl_kernel_bytes(B, D, s, "fwd") + common.reparam_kl_kernel_bytes(B, D, s, "bwd")
            == common.reparam_kl_kernel_bytes(B, D, s, "fwd_bwd"))


def test_conftest_marks_interrupted_runs_partial():
    sys.path.insert(0, str(BENCH))
    conftest = _load("fastvae_bench_conftest", BENCH / "conftest.py")

    class Session:
        shouldstop = False
        testsfailed = 0

    conftest.pytest_sessionstart(Session())
    out = {"benchmarks": []}
    conftest.pytest_benchmark_update_json(None, [], out)
    assert out["fastvae"]["partial"] is False
    conftest.pytest_keyboard_interrupt(None)
    conftest.pytest_benchmark_update_json(None, [], out)
    assert out["fastvae"]["partial"] is True and out["fastvae"]["partial_reason"] == "interrupted"


def _bench_env(**extra):
    # not this run's PYTEST_* variables: pytest-benchmark disables itself (and writes no JSON)
    # where PYTEST_XDIST_WORKER says it runs in an xdist worker, as make test's tests do
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(FASTVAE_BENCH_SMOKE="1", PYTHONUNBUFFERED="1", **extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


