"""Turn pytest-benchmark JSON files into tables, a ratio chart and regression reports.

Needs only the standard library and matplotlib (no torch), so it runs anywhere.

    python benchmarks/report.py render  DIR [--md FILE] [--png FILE]
        DIR/*.json (one pytest-benchmark JSON per suite) -> DIR/README.md (one markdown table per
        suite, with a header naming the device, versions, date and commit) and DIR/ratios.png
        (bar chart of each implementation's speedup over its baseline); a
        reparam_kl_device.json there (benchmarks/reparam_kl_device.py) adds its own table and
        DIR/reparam_kl_device.png.
    python benchmarks/report.py compare OLD NEW [--threshold 0.10] [--stat median] [--fail]
        OLD/NEW: two JSON files, or two result folders (suites matched by file name). Prints
        every benchmark whose time grew by more than the threshold ("SLOWER ..."), those that
        got faster, and those that appear in only one run; --fail exits 1 on any regression.
        --table also prints pytest-benchmark's own side-by-side table (`pytest-benchmark compare`).
    python benchmarks/report.py store SRC [--results benchmarks/results] [--threshold 0.10]
        Files a run made elsewhere (e.g. the GPU machine's $OUT): copies SRC/*.json into
        benchmarks/results/<slug>/ (slug from the JSON's machine_info), printing the comparison
        with what was stored there before, then renders that folder.
    python benchmarks/report.py summary DIR [DIR ...] [--readme README.md]
        One markdown table of the speedups across devices (one column per result folder), for
        the project README; --readme replaces the text between the markers
        <!-- bench:begin --> and <!-- bench:end --> in that file.

Ratio convention (see benchmarks/README.md): within one JSON (one run) benchmarks are compared
per key (group, extra_info["case"]); the one with extra_info["baseline"] true is the baseline,
and every other benchmark of the key gets speedup = baseline median / its median.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

STAT = "median"
BEGIN_MARK = "<!-- bench:begin -->"
END_MARK = "<!-- bench:end -->"


# --------------------------------------------------------------------------- loading


@dataclass
class Row:
    """One benchmark of one run, with the figures the tables show."""

    suite: str
    name: str
    group: str
    case: str
    impl: str
    baseline: bool
    time_s: float | None  # the chosen statistic (median by default), seconds per call
    stats: dict[str, Any]
    extra: dict[str, Any]
    speedup: float | None = None

    @property
    def key(self) -> str:
        return f"{self.suite}::{self.name}"

    @property
    def label(self) -> str:
        parts = [self.group or self.suite, self.impl]
        if self.case:
            parts.append(f"[{self.case}]")
        return " ".join(p for p in parts if p)


@dataclass
class Run:
    """One pytest-benchmark JSON file (= one suite run on one machine)."""

    path: Path
    suite: str
    data: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    @property
    def info(self) -> dict[str, Any]:
        mi = self.data.get("machine_info", {}) or {}
        info = dict(mi.get("fastvae") or {})
        info.setdefault("device", mi.get("device") or (mi.get("cpu") or {}).get("brand_raw"))
        info.setdefault("python", mi.get("python_version"))
        info.setdefault("date", self.data.get("datetime"))
        commit = self.data.get("commit_info", {}) or {}
        if info.get("git_commit") in (None, "unknown"):
            info["git_commit"] = commit.get("id")
        return info

    @property
    def smoke(self) -> bool:
        """A smoke run (tiny sizes): its figures mean nothing."""
        block = self.data.get("fastvae") or {}
        return bool(self.info.get("smoke") or block.get("smoke"))

    @property
    def partial(self) -> str | None:
        """Why the run's data is incomplete (interrupted, e.g. by a time cap; failed tests), or None."""
        block = self.data.get("fastvae") or {}
        if not block.get("partial"):
            return None
        return str(block.get("partial_reason") or "cut short")


def suite_of(path: Path) -> str:
    """``results/x/reparam_kl.json`` -> ``reparam_kl``; ``test_bench_train.json`` -> ``train``."""
    stem = path.stem
    return stem[len("test_bench_") :] if stem.startswith("test_bench_") else stem


def _case_of(bench: dict[str, Any]) -> str:
    extra = bench.get("extra_info") or {}
    case = extra.get("case")
    return "" if case is None else str(case)


def load_run(path: Path | str, stat: str = STAT) -> Run:
    """Read one pytest-benchmark JSON file; raises ValueError if it is not one."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf8"))
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks')")
    run = Run(path=path, suite=suite_of(path), data=data)
    for bench in data["benchmarks"]:
        stats = bench.get("stats") or {}
        extra = bench.get("extra_info") or {}
        value = stats.get(stat)
        run.rows.append(
            Row(
                suite=run.suite,
                name=bench.get("name") or bench.get("fullname", "?"),
                group=bench.get("group") or "",
                case=_case_of(bench),
                impl=str(extra.get("impl") or bench.get("param") or bench.get("name", "")),
                baseline=bool(extra.get("baseline")),
                time_s=float(value) if isinstance(value, (int, float)) and value > 0 else None,
                stats=stats,
                extra=extra,
            )
        )
    compute_speedups(run.rows)
    return run


def load_dir(folder: Path | str, stat: str = STAT) -> list[Run]:
    """Every pytest-benchmark JSON in ``folder`` (not recursive), sorted by suite; others skipped."""
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        if path.name in EXTRA_RESULTS or path.name == MACHINE_JSON:  # known non-benchmark results
            continue
        try:
            runs.append(load_run(path, stat))
        except (ValueError, json.JSONDecodeError) as exc:
            print(f"report: skipping {path}: {exc}", file=sys.stderr)
    return runs


def compute_speedups(rows: list[Row]) -> None:
    """Set ``row.speedup`` = baseline time / row time within each (group, case) key."""
    keyed: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        keyed.setdefault((row.group, row.case), []).append(row)
    for (group, case), members in keyed.items():
        baselines = [r for r in members if r.baseline]
        if not baselines:
            continue
        if len(baselines) > 1:
            names = ", ".join(r.name for r in baselines)
            print(f"report: group {group!r} case {case!r} has several baselines ({names}); "
                  f"using the first", file=sys.stderr)
        base = baselines[0]
        for row in members:
            if base.time_s and row.time_s:
                row.speedup = base.time_s / row.time_s


# --------------------------------------------------------------------------- formatting


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = float(f"{seconds:.3g}")  # round first: 0.9999 s -> 1 s, not "1e+03 ms"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"  # pragma: no cover


def fmt_si(value: Any, unit: str = "") -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    value = float(f"{value:.3g}")
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}".rstrip()
    return f"{value:.3g} {unit}".rstrip()


def fmt_num(value: Any, digits: int = 3, suffix: str = "") -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    if abs(value) >= 10 ** (digits - 1):  # no exponent for big numbers: 125, 1500, 3350
        return f"{value:.0f}{suffix}"
    return f"{value:.{digits}g}{suffix}"


def fmt_speedup(row: Row) -> str:
    if row.baseline:
        return "1 (baseline)"
    if row.speedup is None:
        return "—"
    return _x(row.speedup)


def _x(ratio: float) -> str:
    """2.00×, 0.53×, 0.0023× (two significant digits below 0.1)."""
    return f"{ratio:.2f}×" if ratio >= 0.1 else f"{ratio:.2g}×"


# Ratios a benchmark measured itself, side by side in one timed call (interleaved epochs):
# extra_info key -> label in the table.
MEASURED_RATIOS = {"speedup": "speedup",
                   "speedup_vs_plain_deferred_read": "vs plain reading every 32 steps",
                   "speedup_vs_plain_compile_fused_adam": "vs plain compile + fused Adam",
                   "per_step_read_cost": "per-step-read cost",
                   "time_ratio": "time ratio", "time_ratio_vs_fused_adam": "vs fused Adam",
                   "speedup_p50": "p50 speedup", "p99_over_p50": "p99/p50", "seeded_speedup": "seeded"}


# the measured ratios the summary shows beside the speedups: speedups (higher is faster) and
# time ratios (lower is faster), named so; spreads (p99/p50) and costs stay in the tables
SUMMARY_RATIOS = {"speedup": "speedup", "speedup_vs_plain_deferred_read": "speedup vs plain reading every 32 steps",
                  "speedup_vs_plain_compile_fused_adam": "speedup vs plain compile + fused Adam",
                  "speedup_p50": "p50 speedup", "seeded_speedup": "seeded speedup",
                  "time_ratio": "time ratio (lower: faster)"}


class Ratio(NamedTuple):
    row: Row
    comparison: str  # as the summary names it
    value: float
    key: str | None  # the extra_info key of a ratio measured in one run; None: over the baseline


def ratio_entries(run: Run) -> list[Ratio]:
    """Every ratio ``run`` holds: each non-baseline row's speedup over its group's baseline,
    then the ratios a benchmark measured side by side in one run (:data:`SUMMARY_RATIOS`)."""
    baselines = {(r.group, r.case): r.impl for r in run.rows if r.baseline}
    entries = []
    for r in run.rows:
        if not r.baseline and r.speedup is not None:
            entries.append(Ratio(r, f"{r.impl} vs {baselines[(r.group, r.case)]}", r.speedup, None))
        entries += [Ratio(r, f"{r.impl}: {label} (measured in one run)", r.extra[name], name)
                    for name, label in SUMMARY_RATIOS.items()
                    if isinstance(r.extra.get(name), (int, float)) and math.isfinite(r.extra[name])]
    return entries


def fmt_measured_ratios(row: Row) -> str:
    cells = [f"{label} {_x(row.extra[key])}" for key, label in MEASURED_RATIOS.items()
             if isinstance(row.extra.get(key), (int, float)) and math.isfinite(row.extra[key])]
    return ", ".join(cells) or "—"


# Columns: (header, getter); a column whose cells are all "—" is left out of a table.
COLUMNS: list[tuple[str, Any]] = [
    ("group", lambda r: r.group or "—"),
    ("case", lambda r: r.case or "—"),
    ("benchmark", lambda r: f"`{r.name}`"),
    ("impl", lambda r: r.impl or "—"),
    ("time", lambda r: fmt_time(r.time_s)),
    ("throughput (items/s)", lambda r: fmt_si(r.extra.get("throughput"))),
    ("speedup vs baseline", fmt_speedup),
    ("bandwidth (GB/s)", lambda r: fmt_num(r.extra.get("bandwidth_GBps"), 3)),
    ("% of peak BW", lambda r: fmt_num(100 * r.extra["bandwidth_fraction"], 3, " %")
     if isinstance(r.extra.get("bandwidth_fraction"), (int, float)) else "—"),
    ("peak mem (MB)", lambda r: fmt_num(r.extra.get("peak_memory_MB"), 4)),
    ("interleaved ratios", fmt_measured_ratios),
    ("rounds", lambda r: str(r.stats.get("rounds", "—"))),
]


def markdown_table(rows: list[Row], stat: str = STAT) -> str:
    """A GitHub markdown table of ``rows`` (times are ``stat``); empty columns are dropped."""
    if not rows:
        return "_no benchmarks recorded_\n"
    cells = [[get(r) for _, get in COLUMNS] for r in rows]
    keep = [i for i, (head, _) in enumerate(COLUMNS)
            if head in ("benchmark", "time") or any(c[i] != "—" for c in cells)]
    heads = [f"{stat} time" if COLUMNS[i][0] == "time" else COLUMNS[i][0] for i in keep]
    lines = ["| " + " | ".join(heads) + " |",
             "|" + "|".join(" --- " for _ in keep) + "|"]
    for c in cells:
        lines.append("| " + " | ".join(c[i] for i in keep) + " |")
    return "\n".join(lines) + "\n"


def _short(commit: Any) -> str:
    commit = str(commit or "unknown")
    return commit[:12] if re.fullmatch(r"[0-9a-f]{13,40}", commit) else commit


def header_lines(runs: list[Run]) -> list[str]:
    info = runs[0].info if runs else {}
    keys = [
        ("device", "device"), ("device_type", "type"), ("gpu_memory_GB", "GPU memory (GB)"),
        ("peak_bandwidth_GBps", "peak bandwidth (GB/s)"), ("driver", "driver"), ("cuda", "CUDA"),
        ("cpu", "CPU"), ("cpu_count", "CPU cores"), ("torch", "torch"), ("triton", "triton"),
        ("onnxruntime", "onnxruntime"), ("python", "python"), ("date", "date"),
    ]
    lines = [f"- {label}: {info[k]}" for k, label in keys if info.get(k) not in (None, "")]
    dates = sorted({str(r.info["date"]) for r in runs if r.info.get("date")})
    if len(dates) > 1:  # one line for the whole run: first suite's start .. last suite's
        lines = [f"- date: {dates[0]} .. {dates[-1]}" if line.startswith("- date:") else line
                 for line in lines]
    def commit_of(run_info: dict) -> str:
        commit = _short(run_info.get("git_commit"))
        return commit + (" (uncommitted changes)" if run_info.get("git_dirty") else "")

    commits = {commit_of(r.info) for r in runs} or {commit_of(info)}
    if len(commits) == 1:
        lines.append(f"- git commit: {commits.pop()}")
    else:  # suites stored from different runs: say which code made which file
        lines.append("- git commits: " + ", ".join(f"{r.path.name} {commit_of(r.info)}" for r in runs))
    smoke = [r.path.name for r in runs if r.smoke]
    if smoke and len(smoke) == len(runs):
        lines.append("- **smoke run (tiny sizes): the figures mean nothing**")
    elif smoke:
        lines.append(f"- **smoke run (tiny sizes): the figures of {', '.join(smoke)} mean nothing**")
    elif not runs and info.get("smoke"):
        lines.append("- **smoke run (tiny sizes): the figures mean nothing**")
    for r in runs:
        if r.partial:
            lines.append(f"- **partial: {r.path.name} is incomplete ({r.partial}): benchmarks may be missing**")
    return lines


def extra_flag_lines(folder: Path) -> list[str]:
    """Warnings about the extras in ``folder`` (not tables): smoke files (the heuristics of
    :func:`_smoke_extras`) and extras whose JSON says they stopped early (``complete``: false)."""
    lines = [f"- **smoke run: {name} comes from a smoke run (tiny sizes); its figures mean nothing**"
             for name in _smoke_extras(folder) if name != DEVICE_RESULT]
    for name in EXTRA_RESULTS:
        data = _read_json(folder / name)
        if isinstance(data, dict) and data.get("complete") is False and name != DEVICE_RESULT:
            where = f"; stopped before {data['stopped_before']}" if data.get("stopped_before") else ""
            lines.append(f"- **partial: {name} stopped at its time budget or was interrupted{where}**")
    return lines


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- render


def chart_bars(run: Run) -> list[tuple[str, float]]:
    """(label, speedup) bars of one suite: :func:`ratio_entries`, a time ratio (lower is
    faster) drawn as its inverse so that every bar reads "higher is faster"."""
    bars = []
    for r, comparison, value, key in ratio_entries(run):
        if value <= 0:  # nothing to draw on a ratio axis (and no inverse)
            continue
        if key == "time_ratio":
            comparison, value = f"{r.impl}: 1 / time ratio (one run)", 1 / value
        elif key is not None:
            comparison = f"{r.impl}: {SUMMARY_RATIOS[key]} (one run)"
        where = f"{r.group} [{r.case}]" if r.case else (r.group or run.suite)
        bars.append((f"{where}: {comparison}", value))
    return bars


def write_chart(runs: list[Run], png: Path, stat: str = STAT) -> Path:
    """Bar chart of the speedups (one panel per suite with ratios); always writes ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(run.suite, chart_bars(run)) for run in runs]
    panels = [(s, bars) for s, bars in panels if bars]
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no speedup ratios recorded", ha="center", va="center")
    else:
        heights = [max(1.2, 0.45 * len(bars) + 0.8) for _, bars in panels]
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights)),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (suite, bars) in zip(axes[:, 0], panels):
            labels = [label for label, _ in bars]
            values = [value for _, value in bars]
            colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
            y = list(range(len(bars)))
            ax.barh(y, values, color=colors)
            ax.set_yticks(y, labels, fontsize=8)
            ax.invert_yaxis()
            ax.axvline(1.0, color="black", linewidth=0.8)
            for yi, v in zip(y, values):
                ax.text(v, yi, f" {_x(v)}", va="center", fontsize=8)
            lo, hi = min(values + [1.0]), max(values + [1.0])
            if hi / lo > 20:  # ratios over orders of magnitude: log scale, bars start at lo/2
                ax.set_xscale("log")
                ax.set_xlim(lo / 2, hi * 3)
            else:
                ax.set_xlim(0, hi * 1.25)
            ax.set_title(f"{suite}: speedups, {stat} times (> 1: faster)", fontsize=9, loc="right")
    info = runs[0].info if runs else {}
    fig.suptitle(str(info.get("device") or ""), fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def render_markdown(runs: list[Run], png_name: str | None = "ratios.png", stat: str = STAT,
                    notes: Iterable[str] = ()) -> str:
    """The folder's README: header (device, versions, commit; smoke and partial marks, and
    ``notes``: lines about the extras), then one table per suite."""
    info = runs[0].info if runs else {}
    title = info.get("device") or "unknown device"
    out = [f"# Benchmark results: {title}", "",
           "Made by `benchmarks/report.py render` from the JSON files in this folder "
           f"({stat} time per benchmark call: one round of an interleaved benchmark, all its arms, "
           "and where an op runs several times per call, all of them (throughput counts them); "
           "speedup = baseline time / time, same run).", ""]
    out += header_lines(runs) + list(notes) + [""]
    if png_name:
        out += [f"![speedups]({png_name})", ""]
    if not runs:
        out += ["_no results in this folder_", ""]
    for run in runs:
        out += [f"## {run.suite}", "", f"From `{run.path.name}`.", "", markdown_table(run.rows, stat)]
    return "\n".join(out).rstrip() + "\n"


def render(folder: Path | str, md: Path | None = None, png: Path | None = None,
           stat: str = STAT) -> tuple[Path, Path]:
    """Write the folder's README.md table and ratios.png; returns their paths."""
    folder = Path(folder)
    runs = load_dir(folder, stat)
    md = md or folder / "README.md"
    png = png or folder / "ratios.png"
    write_chart(runs, png, stat)
    png_rel = png.name if png.parent.resolve() == md.parent.resolve() else str(png)
    md.parent.mkdir(parents=True, exist_ok=True)
    device = load_device_result(folder)
    notes = extra_flag_lines(folder)
    text = render_markdown(runs, png_rel, stat, notes) if runs or device is None else ""
    if device is not None:  # its own table and chart, after the suites' (or alone)
        chart = write_device_chart(device, md.parent / DEVICE_PNG)
        section = device_markdown(device, chart.name, header=not runs, notes=notes if not runs else ())
        text = (text.rstrip() + "\n\n" + section) if text else section
    md.write_text(text, encoding="utf8")
    return md, png


# --------------------------------------------------------------------------- device time

DEVICE_RESULT = "reparam_kl_device.json"  # benchmarks/reparam_kl_device.py (its documented schema)
DEVICE_PNG = "reparam_kl_device.png"


def load_device_result(folder: Path | str) -> dict[str, Any] | None:
    path = Path(folder) / DEVICE_RESULT
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf8"))
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        print(f"report: skipping {path}: no records", file=sys.stderr)
        return None
    return data


def _case_records(data: dict[str, Any]) -> dict[tuple, dict[str, dict]]:
    """{(B, D, dtype, pass): {impl: record}}, in the file's order."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in data["records"]:
        cases.setdefault((r["B"], r["D"], r["dtype"], r["pass"]), {})[r["impl"]] = r
    return cases


def _fmt_us(value: Any) -> str:
    return fmt_time(value * 1e-6) if isinstance(value, (int, float)) else "—"


def _fmt_ratio(value: float | None) -> str:
    return _x(value) if value is not None else "—"


def _ratio(num: Any, den: Any) -> float | None:
    ok = all(isinstance(v, (int, float)) and v > 0 for v in (num, den))
    return num / den if ok else None


def device_is_smoke(data: dict[str, Any]) -> bool:
    """A smoke device-time result: its ``smoke`` flag; older files carry none, and a CPU smoke
    run there has one size and one dtype (at most 4 records)."""
    if "smoke" in data:
        return bool(data["smoke"])
    return "cpu" in data and len(data.get("records", [])) <= 4


def device_markdown(data: dict[str, Any], png_name: str, header: bool = True,
                    notes: Iterable[str] = ()) -> str:
    """The device-time table: per case and implementation device time, % of a copy's
    bandwidth (on the op's required bytes, and on the kernels' own traffic where recorded),
    speedups over eager and torch.compile (device time), host and end-to-end time."""
    gpu = "gpu" in data
    out = []
    if header:
        name = data.get("gpu") or data.get("cpu") or "unknown device"
        out += [f"# Benchmark results: {name}", ""]
        if notes:
            out += list(notes) + [""]
    out += ["## reparam_kl_device", "",
            f"From `{DEVICE_RESULT}` ({'GPU' if gpu else 'CPU'}: {data.get('gpu') or data.get('cpu')}; "
            f"torch {data.get('torch')}, triton {data.get('triton')}, {data.get('date')}, "
            f"commit {_short(data.get('commit'))}); made by `benchmarks/reparam_kl_device.py`, "
            "whose docstring says how each figure is measured.", ""]
    if device_is_smoke(data):
        out += ["**Smoke run (tiny sizes, few calls): the figures mean nothing.**", ""]
    if data.get("complete") is False:
        where = f" before {data['stopped_before']}" if data.get("stopped_before") else ""
        out += [f"**Partial: the run stopped at its time budget or was interrupted{where}; "
                "later sizes are missing.**", ""]
    kernel = gpu and any(isinstance(r.get("kernel_frac_of_copy"), (int, float)) for r in data["records"])
    if gpu:
        out += ["Device time: median CUDA-graph replay, L2 flushed before each. % of copy: bytes "
                "the op must move / device time, over a device-to-device copy of those bytes. "
                + ("% of copy (kernel traffic): the same with the fused kernels' own traffic "
                   "(the backward re-reads mu and logvar: 8 B x D passes for fwd_bwd, not 6). "
                   if kernel else "")
                + "Host / e2e: per call of 20 back-to-back calls without graphs.", ""]
        heads = ["B", "D", "dtype", "pass", "impl", "device time", "% of copy"]
        heads += ["% of copy (kernel traffic)"] if kernel else []
        heads += ["vs eager", "vs compile", "host", "e2e", "e2e vs eager"]
    else:
        out += ["Host time only (a CPU): thread CPU time per call; the fused op's launch itself "
                "is stubbed out, eager is the torch math on the same tiny tensors.", ""]
        heads = ["B", "D", "dtype", "pass", "impl", "host", "host / eager's"]
    out += [f"![device time]({png_name})", "", "| " + " | ".join(heads) + " |",
            "|" + "|".join(" --- " for _ in heads) + "|"]
    for (B, D, dtype, mode), impls in _case_records(data).items():
        eager, compiled = impls.get("eager", {}), impls.get("compile", {})
        for impl, r in impls.items():
            us, x = _fmt_us, _fmt_ratio
            cells = [str(B), str(D), dtype, mode, impl]
            if gpu:
                pct = [r.get("frac_of_copy")] + ([r.get("kernel_frac_of_copy")] if kernel else [])
                cells += [us(r.get("device_us"))]
                cells += [fmt_num(100 * f, 3, " %") if isinstance(f, (int, float)) else "—" for f in pct]
                cells += [x(_ratio(eager.get("device_us"), r.get("device_us"))),
                          x(_ratio(compiled.get("device_us"), r.get("device_us"))),
                          us(r.get("host_us")), us(r.get("e2e_us")),
                          x(_ratio(eager.get("e2e_us"), r.get("e2e_us")))]
            else:
                cells += [us(r.get("host_us")), x(_ratio(r.get("host_us"), eager.get("host_us")))]
            out.append("| " + " | ".join(cells) + " |")
        if not gpu:  # the floors measured in the same rounds (a CPU run's host_floor)
            for f in data.get("host_floor", []):
                if (f["B"], f["D"], f["dtype"], f["pass"]) == (B, D, dtype, mode):
                    out.append(f"| {B} | {D} | {dtype} | {mode} | floor: {f['impl']} | {_fmt_us(f['host_us'])} | "
                               f"{_fmt_ratio(_ratio(f['host_us'], eager.get('host_us')))} |")
    return "\n".join(out) + "\n"


def write_device_chart(data: dict[str, Any], png: Path) -> Path:
    """GPU: the fused op's fraction of copy bandwidth per case (goal line at 85 %) and its
    device-time speedups over eager and torch.compile; CPU: host time over eager's (goal 0.5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = _case_records(data)
    gpu = "gpu" in data
    panels = []
    if gpu:
        frac = [(f"B={B} D={D} {dt} {m}", impls["fused"].get("frac_of_copy"))
                for (B, D, dt, m), impls in cases.items() if "fused" in impls]
        panels.append(("fused: bytes / device time, fraction of a copy's bandwidth", frac, 0.85))
        for other in ("compile", "eager"):
            speed = [(f"B={B} D={D} {dt} {m}",
                      _ratio(impls.get(other, {}).get("device_us"), impls["fused"].get("device_us")))
                     for (B, D, dt, m), impls in cases.items() if "fused" in impls]
            panels.append((f"fused device-time speedup over {other}", speed, 1.0))
    else:
        host = [(f"B={B} D={D} {dt} {m}",
                 _ratio(impls.get("fused", {}).get("host_us"), impls.get("eager", {}).get("host_us")))
                for (B, D, dt, m), impls in cases.items()]
        panels.append(("fused host time / eager's (goal <= 0.5)", host, 0.5))
    panels = [(t, [(k, v) for k, v in rows if v is not None], line) for t, rows, line in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no device-time records", ha="center", va="center")
    else:
        heights = [max(1.2, 0.3 * len(rows) + 0.8) for _, rows, _ in panels]
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, sum(heights)),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (title, rows, line) in zip(axes[:, 0], panels):
            y = list(range(len(rows)))
            values = [v for _, v in rows]
            ax.barh(y, values, color="tab:blue")
            ax.set_yticks(y, [k for k, _ in rows], fontsize=7)
            ax.invert_yaxis()
            ax.axvline(line, color="black", linewidth=0.8, linestyle="--")
            for yi, v in zip(y, values):
                ax.text(v, yi, f" {v:.2f}", va="center", fontsize=7)
            ax.set_xlim(0, max(values + [line]) * 1.25)
            ax.set_title(title, fontsize=9)
    fig.suptitle(str(data.get("gpu") or data.get("cpu") or ""), fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------- compare


@dataclass
class Change:
    key: str
    old: float
    new: float

    @property
    def ratio(self) -> float:
        return self.new / self.old


def _pairs(old: Path, new: Path) -> list[tuple[Path, Path]]:
    """(old, new) suite JSONs: two files, or the suites two folders have in common (by file
    name; the extras, machine.json and the device-time result are not suites: skipped)."""
    if old.is_dir() and new.is_dir():
        names = sorted({p.name for p in old.glob("*.json")} & {p.name for p in new.glob("*.json")})
        skip = set(EXTRA_RESULTS) | {MACHINE_JSON, DEVICE_RESULT}
        return [(old / n, new / n) for n in names if n not in skip]
    if old.is_dir() or new.is_dir():
        raise SystemExit("compare: give two files or two folders")
    return [(old, new)]


def _changes(key: str, old: Row, new: Row, out) -> list[Change]:
    """What to compare of one benchmark in two runs: its time, or, for an interleaved one (its
    ``arm_medians_s``: several implementations timed round after round), each arm's own median,
    ``KEY[arm]`` (a round's time sums the arms: an arm added, or one slower among five, would
    read as a change of the whole)."""
    arms_new, arms_old = new.extra.get("arm_medians_s"), old.extra.get("arm_medians_s")
    if isinstance(arms_new, dict) or isinstance(arms_old, dict):
        if not (isinstance(arms_new, dict) and isinstance(arms_old, dict)):
            print(f"NOTE    {key}: interleaved, and one run does not record its arms' times: not compared",
                  file=out)
            return []
        for arm in sorted(arms_new.keys() - arms_old.keys()):
            print(f"NEW     {key}[{arm}]: {fmt_time(arms_new[arm])}", file=out)
        for arm in sorted(arms_old.keys() - arms_new.keys()):
            print(f"GONE    {key}[{arm}]", file=out)
        return [Change(f"{key}[{arm}]", arms_old[arm], arms_new[arm]) for arm in sorted(arms_new)
                if arm in arms_old and arms_old[arm] and arms_new[arm]]
    if not (old.time_s and new.time_s):
        return []
    return [Change(key, old.time_s, new.time_s)]


def compare(old: Path | str, new: Path | str, threshold: float = 0.10, stat: str = STAT,
            out=None) -> list[Change]:
    """Print what got slower (or faster) by more than ``threshold``; return the regressions."""
    out = out or sys.stdout
    old, new = Path(old), Path(new)
    regressions: list[Change] = []
    pairs = _pairs(old, new)
    if not pairs:
        print(f"compare: no suite in common between {old} and {new}", file=out)
    for old_path, new_path in pairs:
        try:
            a, b = load_run(old_path, stat), load_run(new_path, stat)
        except (ValueError, json.JSONDecodeError) as exc:  # a folder's other JSON: not a suite
            print(f"compare: skipping {old_path.name}: {exc}", file=out)
            continue
        if a.suite != b.suite:  # two files of differently named suites: key by name only
            for r in a.rows:
                r.suite = b.suite
        da, db = a.info.get("device"), b.info.get("device")
        if da and db and da != db:
            print(f"warning: {b.suite}: devices differ ({da} vs {db}); times do not compare",
                  file=out)
        for side, run in (("old", a), ("new", b)):
            if run.smoke:
                print(f"warning: {b.suite}: the {side} run ({run.path}) is a smoke run (tiny sizes); "
                      "its times mean nothing", file=out)
            if run.partial:
                print(f"warning: {b.suite}: the {side} run ({run.path}) is partial ({run.partial}); "
                      "missing benchmarks show as GONE/NEW", file=out)
        old_rows = {r.key: r for r in a.rows}
        new_rows = {r.key: r for r in b.rows}
        faster = []
        for key, nr in new_rows.items():
            orow = old_rows.get(key)
            if orow is None:
                print(f"NEW     {key}: {fmt_time(nr.time_s)}", file=out)
                continue
            for change in _changes(key, orow, nr, out):
                if change.ratio > 1 + threshold:
                    regressions.append(change)
                elif change.ratio < 1 / (1 + threshold):
                    faster.append(change)
        for key in old_rows.keys() - new_rows.keys():
            print(f"GONE    {key}", file=out)
        for c in faster:
            print(f"FASTER  {c.key}: {stat} {fmt_time(c.old)} -> {fmt_time(c.new)} "
                  f"({(c.ratio - 1) * 100:+.1f}%)", file=out)
    for c in regressions:
        print(f"SLOWER  {c.key}: {stat} {fmt_time(c.old)} -> {fmt_time(c.new)} "
              f"({(c.ratio - 1) * 100:+.1f}%)", file=out)
    print(f"compare: {len(regressions)} benchmark(s) slower by more than "
          f"{threshold:.0%} ({stat})", file=out)
    return regressions


def pytest_benchmark_table(old: Path, new: Path) -> int:
    """pytest-benchmark's own side-by-side table of the two runs (informational)."""
    rc = 0
    for a, b in _pairs(Path(old), Path(new)):
        if a.resolve() == b.resolve():  # pytest-benchmark cannot load one file twice
            continue
        # absolute both: pytest-benchmark refuses a relative path beside an absolute one
        cmd = [sys.executable, "-m", "pytest_benchmark", "compare", str(a.resolve()), str(b.resolve()),
               "--group-by=name", "--columns=min,median,mean,rounds", "--sort=name"]
        rc |= subprocess.run(cmd, check=False).returncode
    return rc


# --------------------------------------------------------------------------- store


EXTRA_RESULTS = ("precision.json", "tile_sweep.json", "photo_quality.json", "footprint.json", "run.log",
                 "reparam_kl_device.json")


MACHINE_JSON = "machine.json"  # run.sh's record of the machine (the device of a run without suites)
PACKED = "results.tgz"  # what benchmarks/gpu/run.sh packs its outputs into on a GPU machine


def store(src: Path | str, results: Path | str, threshold: float = 0.10, stat: str = STAT,
          out=None, force: bool = False) -> Path | None:
    """Copy the suite JSONs of ``src`` into ``results/<slug>/``, compare, render; returns the
    folder (``None`` when ``src`` holds no result). ``EXTRA_RESULTS`` files in ``src``
    (bf16-vs-fp32 check, kernel tile sweep, the run's log) are copied too, also from a run that
    wrote no suite JSON (GPU tests only, extras only); the log is also kept as
    ``run-<UTC time>.log``, so that a later run does not replace it. ``src`` may be a folder
    holding ``results.tgz`` (run.sh's packed outputs) or that archive itself."""
    import tarfile
    import tempfile

    src = Path(src)
    packed = src if src.is_file() else src / PACKED
    if packed.is_file():
        with tempfile.TemporaryDirectory() as unpacked:
            with tarfile.open(packed) as archive:
                names = archive.getnames()
                if any(name.startswith(("/", "..")) or "/../" in name for name in names):
                    raise SystemExit(f"store: {packed} holds paths outside its folder")
                # the "data" filter (Python >= 3.11.4, 3.12's default to be) also refuses links
                # out of the folder and device files
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                archive.extractall(unpacked, **kwargs)
            print(f"store: unpacked {packed}", file=out or sys.stdout)
            return store(unpacked, results, threshold, stat, out, force)
    return _store(src, results, threshold, stat, out or sys.stdout, force)


def _store(src: Path, results: Path | str, threshold: float, stat: str, out, force: bool) -> Path | None:
    import shutil
    import tempfile

    runs = load_dir(src, stat)
    device = load_device_result(src)
    # + each suite's figures as its tests ended (run.sh's <suite>.extra.jsonl): what a suite
    # killed at its cap measured, where its pytest-benchmark JSON was never written
    extras = [name for name in EXTRA_RESULTS if (src / name).is_file()] + sorted(
        p.name for p in src.glob("*.extra.jsonl") if p.stat().st_size)
    if not runs and device is None and not extras:
        print(f"store: no pytest-benchmark JSON, {DEVICE_RESULT} nor {', '.join(EXTRA_RESULTS)} in {src}", file=out)
        return None
    smoke = [run.path.name for run in runs if run.smoke] + _smoke_extras(src)
    if smoke and not force:
        print(f"store: {', '.join(smoke)} come from a smoke run (tiny sizes); not stored "
              f"(--force stores them anyway)", file=out)
        return None
    slugs = {run.info.get("slug") for run in runs} - {None, ""}
    if not runs:  # a device-time run or extras alone: the machine they name
        slugs = _extra_slugs(src, device)
    if len(slugs) != 1:
        raise SystemExit(f"store: expected one device slug in {src}, found {sorted(slugs)}")
    dest = Path(results) / slugs.pop()
    # a run cut short never replaces a stored file that holds more: it goes beside it, into
    # partial/ (render reads the folder alone), so nothing measured is lost (--force replaces)
    shrinking = {} if force else _shrinking_extras(src, dest, extras)
    if not force:
        shrinking.update(_shrinking_suites(runs, dest, stat))
    dest.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%MZ", time.gmtime())
    for name, why in shrinking.items():
        kept = dest / "partial" / f"{stamp}-{name}"
        kept.parent.mkdir(exist_ok=True)
        shutil.copyfile(src / name, kept)  # suites and extras alike lie in src
        print(f"store: kept the stored {name}: this run's {why}; this run's file is {kept} "
              "(--force replaces the stored one)", file=out)
    runs = [run for run in runs if run.path.name not in shrinking]
    extras = [name for name in extras if name not in shrinking]
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            target = dest / run.path.name
            if target.exists():
                prev = Path(tmp) / run.path.name
                shutil.copyfile(target, prev)
                shutil.copyfile(run.path, target)
                compare(prev, target, threshold, stat, out=out)
            else:
                shutil.copyfile(run.path, target)
            print(f"stored {target}", file=out)
    for name in extras:  # the GPU script's other outputs, kept beside the suites
        shutil.copyfile(src / name, dest / name)
        print(f"stored {dest / name}", file=out)
        if name == "run.log":
            stamped = _stamped_log(src / name, dest)
            shutil.copyfile(src / name, stamped)
            print(f"stored {stamped}", file=out)
    render(dest, stat=stat)
    print(f"rendered {dest / 'README.md'} and {dest / 'ratios.png'}", file=out)
    return dest


def _stamped_log(log: Path, dest: Path) -> Path:
    """``dest/run-<start>.log``: the UTC start the log's first line gives (``... date
    2026-11-30T21:02:22Z``; else now), never another run's log of the same minute."""
    match = re.search(r"date (\d{4}-\d\d-\d\dT\d\d):(\d\d):\d\dZ", log.read_text(encoding="utf8", errors="replace")[:2000])
    stamp = f"{match[1]}{match[2]}Z" if match else time.strftime("%Y-%m-%dT%H%MZ", time.gmtime())
    stamped, n = dest / f"run-{stamp}.log", 1
    while stamped.exists() and stamped.read_bytes() != log.read_bytes():
        n += 1
        stamped = dest / f"run-{stamp}-{n}.log"
    return stamped


def _extra_slugs(src: Path, device: dict | None) -> set[str]:
    """The device slug of a run without suite JSONs: from its device-time result's GPU, or the
    machine its precision check or tile sweep recorded."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import slugify

    slugs = {slugify(device["gpu"])} if device and device.get("gpu") else set()
    for name, key in (("precision.json", "machine"), ("tile_sweep.json", "info"), (MACHINE_JSON, None)):
        try:
            data = json.loads((src / name).read_text(encoding="utf8"))
            slug = (data[key] if key else data)["slug"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        slugs.add(slug)
    return slugs - {None, ""}


def _flag_or(d: dict, fallback: bool) -> bool:
    """``d["smoke"]`` where the file has the flag, else ``fallback`` (older files)."""
    return bool(d["smoke"]) if "smoke" in d else bool(fallback)


# name -> is-smoke test of its JSON; older files without a ``smoke`` flag: heuristics
SMOKE_CHECKS = {
    "tile_sweep.json": lambda d: d.get("smoke"),
    # the protocol is 50 epochs; run.sh's no-CUDA branch runs 2 (older files: the count says it)
    "precision.json": lambda d: _flag_or(d, d.get("machine", {}).get("smoke") or d.get("epochs", 50) < 50),
    # --smoke / a CPU fallback of the GPU step (older files: a CPU smoke run has one size, one
    # dtype: at most 4 records)
    DEVICE_RESULT: lambda d: device_is_smoke(d),
    # --smoke: 2 steps per model (older files: a couple of steps each)
    "photo_quality.json": lambda d: _flag_or(d, d.get("machine", {}).get("smoke") or any(
        isinstance(m, dict) and m.get("steps", 3) <= 2 for m in (d.get("models") or {}).values())),
}


def _smoke_extras(src: Path) -> list[str]:
    """The extras of ``src`` written by a smoke (CPU pipeline) run."""
    found = []
    for name, is_smoke in SMOKE_CHECKS.items():
        data = _read_json(src / name)
        try:
            if isinstance(data, dict) and is_smoke(data):
                found.append(name)
        except (AttributeError, TypeError):
            continue
    return found


def _record_count(name: str, data: Any) -> int | None:
    """How many measurements an extra holds (records, results, precisions), or None."""
    if not isinstance(data, dict):
        return None
    for key in ("records", "results", "runs", "models"):
        if isinstance(data.get(key), (list, dict)):
            return len(data[key])
    return None


def _shrinking_extras(src: Path, dest: Path, names: Iterable[str]) -> dict[str, str]:
    """The extras of ``src`` that would replace a file in ``dest`` holding more records, with why."""
    out = {}
    for name in names:
        new = _record_count(name, _read_json(src / name))
        old = _record_count(name, _read_json(dest / name)) if (dest / name).is_file() else None
        if new is not None and old is not None and new < old:
            out[name] = f"holds {new} records, the stored one {old}"
    return out


def _shrinking_suites(runs: list[Run], dest: Path, stat: str) -> dict[str, str]:
    """The partial suite runs (cut short) that would replace a stored one with more benchmarks."""
    out = {}
    for run in runs:
        target = dest / run.path.name
        if not run.partial or not target.is_file():
            continue
        try:
            stored = load_run(target, stat)
        except (ValueError, json.JSONDecodeError):
            continue
        if len(stored.rows) > len(run.rows):
            out[run.path.name] = (f"is partial ({run.partial}) with {len(run.rows)} benchmarks, the stored "
                                  f"one has {len(stored.rows)}")
    return out


# --------------------------------------------------------------------------- summary


def summary(folders: Iterable[Path | str], stat: str = STAT) -> str:
    """Markdown: one row per non-baseline benchmark, one speedup column per result folder."""
    cols: list[tuple[str, dict[tuple[str, str, str, str], str]]] = []
    order: list[tuple[str, str, str, str]] = []
    for folder in folders:
        folder = Path(folder)
        runs = load_dir(folder, stat)
        device = (runs[0].info.get("device") if runs else None) or folder.name
        cells: dict[tuple[str, str, str, str], str] = {}
        marks = []
        for run in runs:
            # smoke (tiny sizes) and partial (cut short) data carry their mark in every cell
            mark = " (smoke)" if run.smoke else " (partial)" if run.partial else ""
            if mark:
                marks.append(f"{mark.strip(' ()')}: {run.suite}")
            on_gpu_host = run.info.get("device_type") == "cuda"
            for r, comparison, value, _ in ratio_entries(run):
                # a CPU-side benchmark run on a GPU host says so: its column names the GPU
                where = " (cpu)" if on_gpu_host and r.extra.get("device") == "cpu" else ""
                key = (run.suite, r.group, r.case, comparison)
                cells[key] = _x(value) + where + mark
                if key not in order:
                    order.append(key)
        note = f"; {', '.join(marks)}" if marks else ""
        cols.append((f"{device} ([table]({folder.as_posix()}/README.md){note})", cells))
    if not order:
        return "_no speedup ratios recorded yet_\n"
    lines = ["| suite | group | case | comparison | " + " | ".join(h for h, _ in cols) + " |",
             "|" + "|".join(" --- " for _ in range(4 + len(cols))) + "|"]
    for key in order:
        suite, group, case, comp = key
        vals = [cells.get(key, "—") for _, cells in cols]
        lines.append(f"| {suite} | {group or '—'} | {case or '—'} | {comp} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def replace_between_markers(path: Path, text: str) -> bool:
    """Replace what lies between BEGIN_MARK and END_MARK in ``path``; False if no markers."""
    content = path.read_text(encoding="utf8")
    start, end = content.find(BEGIN_MARK), content.find(END_MARK)
    if start < 0 or end < start:
        return False
    new = content[: start + len(BEGIN_MARK)] + "\n" + text.rstrip() + "\n" + content[end:]
    path.write_text(new, encoding="utf8")
    return True


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stat_opt = argparse.ArgumentParser(add_help=False)
    stat_opt.add_argument("--stat", default=STAT, choices=["min", "median", "mean", "max"],
                          help="statistic of the round times to use (default: median)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("render", parents=[stat_opt],
                       help="README.md table + ratios.png for one result folder")
    p.add_argument("folder", type=Path)
    p.add_argument("--md", type=Path)
    p.add_argument("--png", type=Path)
    p = sub.add_parser("compare", parents=[stat_opt], help="regressions of NEW against OLD (files or folders)")
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--threshold", type=float, default=0.10,
                   help="relative slow-down that counts as a regression (default 0.10 = 10%%)")
    p.add_argument("--fail", action="store_true", help="exit 1 when something got slower")
    p.add_argument("--table", action="store_true",
                   help="also print pytest-benchmark's own comparison table")
    p = sub.add_parser("store", parents=[stat_opt],
                       help="file a run made elsewhere into benchmarks/results/<slug>/")
    p.add_argument("src", type=Path)
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--threshold", type=float, default=0.10)
    p.add_argument("--force", action="store_true",
                   help="store smoke runs too, and extras with fewer records than the stored ones")
    p = sub.add_parser("summary", parents=[stat_opt], help="markdown speedup table across result folders")
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--readme", type=Path,
                   help=f"replace the text between {BEGIN_MARK} and {END_MARK} in this file")
    args = parser.parse_args(argv)

    if args.cmd == "render":
        if not args.folder.is_dir():
            print(f"render: {args.folder} is not a folder", file=sys.stderr)
            return 2
        md, png = render(args.folder, args.md, args.png, args.stat)
        print(f"wrote {md} and {png}")
        return 0
    if args.cmd == "compare":
        for p in (args.old, args.new):
            if not p.exists():
                print(f"compare: {p} does not exist; nothing to compare", file=sys.stderr)
                return 0
        if args.table and pytest_benchmark_table(args.old, args.new):
            print("compare: pytest-benchmark's table failed (its error above); the comparison follows",
                  file=sys.stderr)
        regressions = compare(args.old, args.new, args.threshold, args.stat)
        return 1 if (regressions and args.fail) else 0
    if args.cmd == "store":
        return 0 if store(args.src, args.results, args.threshold, args.stat,
                         force=args.force) else 1
    if args.cmd == "summary":
        text = summary([f for f in args.folders if f.is_dir()], args.stat)
        if args.readme:
            if not replace_between_markers(args.readme, text):
                print(f"summary: no {BEGIN_MARK} ... {END_MARK} markers in {args.readme}",
                      file=sys.stderr)
                return 1
            print(f"updated {args.readme}")
        else:
            sys.stdout.write(text)
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
