"""pytest configuration for the benchmark suites (``pytest benchmarks``).

* Suites import their helpers with ``from common import ...`` (pytest puts this folder, which
  has no ``__init__.py``, on ``sys.path``).
* Records where a run happened: :func:`common.device_info` is merged into pytest-benchmark's
  ``machine_info`` (key ``fastvae``, plus flat ``device``/``torch``/``triton``/``onnxruntime``
  keys), the git commit into ``commit_info`` (``FASTVAE_GIT_COMMIT`` wins, for trees without
  ``.git``), and a ``fastvae`` block (suite names, smoke flag, device slug, ``partial``: the
  run was interrupted, e.g. by gpu/run.sh's ``timeout -s INT``, stopped early, or had failed
  tests, so benchmarks may be missing; ``partial_reason`` says which) into the JSON.
* Drops the raw per-round timings (``stats.data``) from the JSON unless
  ``FASTVAE_BENCH_KEEP_DATA=1``, so stored results stay small.
* ``FASTVAE_BENCH_EXTRA_INFO=FILE``: each test's ``benchmark.extra_info`` is appended to FILE as
  a JSON line ``{"test": nodeid, "extra_info": {...}}``, also under ``--benchmark-disable``
  (which writes no JSON): the smoke test checks what suites record without timing them, and
  gpu/run.sh keeps a suite's figures (``<suite>.extra.jsonl``) even when its cap kills it.
* ``FASTVAE_BENCH_EAGER_FAILURES=1``: a failed test's traceback is printed when it fails.
* Smoke mode (``FASTVAE_BENCH_SMOKE=1``) is reported in the header; on a CPU it also sets
  ``TRITON_INTERPRET=1`` (unless set) so that the fused-kernel benchmarks run, interpreted.
"""

from __future__ import annotations

import os
from pathlib import Path

import common

if common.smoke_mode() and not common.on_gpu():
    # Smoke runs exercise the fused Triton kernel through Triton's interpreter on a CPU. Set
    # before any suite imports fastvae.kernels (triton reads it when a kernel is defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")

_FLAT_KEYS = ("device", "device_type", "torch", "triton", "onnxruntime", "driver", "cuda")
_RUN = {"session": None, "interrupted": False}


def pytest_sessionstart(session):
    _RUN["session"] = session


def pytest_keyboard_interrupt(excinfo):
    # SIGINT (gpu/run.sh's cap): pytest-benchmark still writes what finished; it is marked partial
    _RUN["interrupted"] = True


def _partial_reason() -> str | None:
    session = _RUN["session"]
    if _RUN["interrupted"]:
        return "interrupted"
    if session is not None and session.shouldstop:
        return f"stopped: {session.shouldstop}"
    if session is not None and session.testsfailed:
        return f"{session.testsfailed} test(s) failed"
    return None


def pytest_runtest_teardown(item):
    out = os.environ.get("FASTVAE_BENCH_EXTRA_INFO")
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if out and fixture is not None and fixture.extra_info:
        import json

        with open(out, "a", encoding="utf8") as f:
            f.write(json.dumps({"test": item.nodeid, "extra_info": fixture.extra_info}, default=str) + "\n")


def pytest_runtest_logreport(report):
    # FASTVAE_BENCH_EAGER_FAILURES=1 (gpu/run.sh): a failure's traceback now, not in the summary
    # at the end, which a suite killed at its time cap never prints
    if report.failed and os.environ.get("FASTVAE_BENCH_EAGER_FAILURES") and _RUN["session"] is not None:
        terminal = _RUN["session"].config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.write_line(f"\n----- FAILED {report.nodeid} ({report.when}, {report.duration:.0f} s):")
            terminal.write_line(report.longreprtext[-6000:])


def pytest_report_header(config):
    mode = "SMOKE (tiny sizes)" if common.smoke_mode() else "full"
    where = "cuda" if common.on_gpu() else "cpu"
    return f"fastvae benchmarks: mode={mode}, device={where}, results slug={common.device_slug()}"


def pytest_benchmark_update_machine_info(config, machine_info):
    info = common.device_info()
    machine_info["fastvae"] = info
    for key in _FLAT_KEYS:
        machine_info[key] = info.get(key)


def pytest_benchmark_update_commit_info(config, commit_info):
    commit = common.git_commit()
    if commit["id"] != "unknown" and commit_info.get("id") in (None, "unknown", "unversioned", ""):
        commit_info["id"] = commit["id"]
    if commit["dirty"] is not None and commit_info.get("dirty") is None:
        commit_info["dirty"] = commit["dirty"]
    if os.environ.get(common.COMMIT_ENV):
        commit_info["id"] = os.environ[common.COMMIT_ENV]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json.setdefault("benchmarks", []).extend(common.MERGED_BENCHMARKS)
    suites = sorted(
        {
            Path(b.get("fullname", "").split("::", 1)[0]).stem.removeprefix("test_bench_")
            for b in output_json.get("benchmarks", [])
        }
    )
    if not os.environ.get("FASTVAE_BENCH_KEEP_DATA"):
        # Raw per-round timings can run to 100k numbers per GPU benchmark; the stored results
        # keep the summary statistics only (set FASTVAE_BENCH_KEEP_DATA=1 to keep them).
        for bench in output_json.get("benchmarks", []):
            bench.get("stats", {}).pop("data", None)
    reason = _partial_reason()
    output_json["fastvae"] = {
        "suites": suites,
        "smoke": common.smoke_mode(),
        "slug": common.device_slug(),
        "stat": "median",
        "partial": reason is not None,
        "partial_reason": reason,
    }
