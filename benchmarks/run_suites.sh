#!/usr/bin/env bash
# Run the benchmark suites and record them: what `make bench` calls.
#
#   benchmarks/run_suites.sh                 # every benchmarks/test_bench_*.py
#   benchmarks/run_suites.sh reparam_kl      # some suites (name or path)
#
# For each suite SUITE (benchmarks/test_bench_SUITE.py) this writes the pytest-benchmark JSON to
# benchmarks/results/<device-slug>/SUITE.json (device, versions, date and git commit inside),
# compares it with the run stored there before (prints what got slower), then renders
# benchmarks/results/<device-slug>/README.md (tables) and ratios.png (speedup chart).
#
# Environment:
#   PYTHON                      interpreter (default: .venv/bin/python if present, else python3)
#   FASTVAE_BENCH_OUT           results folder (default: benchmarks/results/<device-slug>;
#                               in smoke mode a folder under /tmp, never the stored results)
#   FASTVAE_BENCH_SMOKE=1       tiny sizes (checks that the suites run; figures mean nothing)
#   BENCH_ARGS                  extra pytest arguments, e.g. "--benchmark-max-time=0.2 -k fused"
#   BENCH_THRESHOLD             relative slow-down reported as a regression (default 0.10)
#   BENCH_FAIL_ON_REGRESSION=1  exit 1 when something got slower than the threshold
# Exit status: 0 when every suite passed (and, with BENCH_FAIL_ON_REGRESSION=1, none regressed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

slug=$("$PY" benchmarks/common.py slug) || { echo "run_suites.sh: cannot determine the device slug" >&2; exit 2; }
if [ -n "${FASTVAE_BENCH_OUT:-}" ]; then out=$FASTVAE_BENCH_OUT
elif [ -n "${FASTVAE_BENCH_SMOKE:-}" ] && [ "${FASTVAE_BENCH_SMOKE}" != 0 ]; then
  out=${TMPDIR:-/tmp}/fastvae-bench-smoke/$slug
else out=benchmarks/results/$slug; fi
mkdir -p "$out" || exit 2
threshold=${BENCH_THRESHOLD:-0.10}

files=()
if [ $# -eq 0 ]; then
  for f in benchmarks/test_bench_*.py; do [ -e "$f" ] && files+=("$f"); done
else
  for s in "$@"; do
    if [ -f "$s" ]; then files+=("$s")
    elif [ -f "benchmarks/test_bench_$s.py" ]; then files+=("benchmarks/test_bench_$s.py")
    else echo "run_suites.sh: no suite '$s' (expected benchmarks/test_bench_$s.py)" >&2; exit 2; fi
  done
fi
if [ ${#files[@]} -eq 0 ]; then echo "run_suites.sh: no benchmark suites (benchmarks/test_bench_*.py) yet"; fi

tmp=$(mktemp -d) || exit 2
trap 'rm -rf "$tmp"' EXIT
status=0
regressed=0
echo "run_suites.sh: results -> $out (device slug $slug)"
for f in "${files[@]}"; do
  name=$(basename "$f" .py); name=${name#test_bench_}
  echo "=== suite $name ($f)"
  start=$SECONDS
  # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
  "$PY" -m pytest "$f" -q -p no:cacheprovider -rs \
    --benchmark-json="$tmp/$name.json" --benchmark-sort=name \
    --benchmark-warmup=on --benchmark-warmup-iterations=3 ${BENCH_ARGS:-}
  rc=$?
  echo "=== suite $name: pytest exit $rc after $((SECONDS - start)) s"
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then echo "FAILED suite $name"; status=1; fi
  if [ -s "$tmp/$name.json" ]; then
    [ -s "$out/$name.json" ] && cp "$out/$name.json" "$tmp/$name.prev.json"
    mv "$tmp/$name.json" "$out/$name.json"
    if [ -s "$tmp/$name.prev.json" ]; then
      "$PY" benchmarks/report.py compare "$tmp/$name.prev.json" "$out/$name.json" \
        --threshold "$threshold" --fail || regressed=1
    fi
  else
    echo "suite $name: no benchmark results written (all skipped or collection failed)"
  fi
done

"$PY" benchmarks/report.py render "$out" || status=1
if [ "$regressed" -ne 0 ]; then
  echo "run_suites.sh: some benchmarks got slower than the stored run by more than $threshold (SLOWER lines above)"
  [ "${BENCH_FAIL_ON_REGRESSION:-0}" = 1 ] && status=1
fi
exit $status
