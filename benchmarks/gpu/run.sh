#!/usr/bin/env bash
# Every GPU check of fastvae in one idempotent script.
#
#   bash benchmarks/gpu/run.sh [OUT_DIR]
#
# 1. installs what the GPU image lacks from wheels in .whl/ (benchmarks/fetch_wheels.sh fetches
#    them; pip --no-index --no-deps, never touching torch) and puts this checkout on PYTHONPATH;
# 2. prints the device, driver, CUDA, torch and triton versions;
# 3. runs the CUDA tests (`pytest -m gpu tests`), the fused op's device-time benchmark
#    (reparam_kl_device.json: CUDA-graph replays, L2 flushed, host time apart), then each
#    benchmark suite, each step guarded so that one failure does not lose the others' results;
#    last, with what is left of the budget, a sweep of the fused kernel's tile sizes and warps
#    (tile_sweep.json: tuning data);
# 4. writes one pytest-benchmark JSON per suite (device, versions, date, git commit, figures)
#    into OUT_DIR (default benchmarks/results/<gpu-slug>/) and keeps the whole log in
#    OUT_DIR/run.log; on a CUDA machine, given an empty OUT_DIR, it then packs everything into
#    OUT_DIR/results.tgz (the device tool brings back 8 files at most; `python
#    benchmarks/report.py store OUT` unpacks, files, compares and renders), elsewhere (or
#    FASTVAE_GPU_PACK=0) it renders OUT_DIR/README.md and OUT_DIR/ratios.png and compares with
#    the stored results.
# A one-shot GPU call should name its subset: the default runs everything, in value order
# (kernel tests first, train, the device-time benchmark, the GPU suites, the CPU-side suites
# last), and what the budget does not reach is reported as SKIPPED.
# It keeps to a time budget (FASTVAE_GPU_BUDGET_S, default 480 s) so that it ends well inside a
# 10-minute slot. On a machine without CUDA the GPU tests skip and the suites run in smoke mode
# (tiny sizes, one round) to check the pipeline; the script still exits 0.
#
# On the device machine (the tree there has no .git, so pass the commit):
#   FASTVAE_GIT_COMMIT=$(git describe --always --dirty --abbrev=40) bash benchmarks/gpu/run.sh "$OUT"
#   (carry .whl; "-dirty": the copy holds uncommitted edits, recorded as git_dirty)
#
# Environment: PYTHON (default python3, or .venv/bin/python where present), FASTVAE_GIT_COMMIT,
# FASTVAE_GPU_BUDGET_S, FASTVAE_GPU_TESTS_CAP_S (default 180 s), FASTVAE_GPU_SUITE_CAP_S
# (default 150 s per suite, 210 s for train, 540 s for convkl), FASTVAE_GPU_SUITES (space-separated suite names; default all:
# train convkl reparam_kl streaming onnx_cuda, then the CPU-side latency sampling serving;
# FASTVAE_GPU_SUITES=streaming FASTVAE_GPU_TESTS_SET=none FASTVAE_GPU_EXTRAS="" measures shards vs
# in-memory training alone),
# FASTVAE_GPU_TESTS_K (pytest -k expression for the GPU tests, and-ed with the set's own),
# FASTVAE_GPU_TESTS_SET (a named subset of the GPU tests: "all" (default); "kernel": the fused
#   reparameterize+KL op's files; "unreached": what the H200 runs of 2026-11-27 could not reach,
#   FSDP + 16-mixed on CUDA, the device-seed kernel, CUDA-graph replays drawing fresh noise;
#   "onnx": the exported decoder on onnxruntime's CUDA provider and IO binding; "none": no tests),
# FASTVAE_GPU_SUITES ("none": no pytest-benchmark suite),
# FASTVAE_GPU_EXTRAS (the steps besides tests and suites: default "reparam_device precision
#   tile_sweep"; "" skips all three; reparam_device runs after train, or right after the tests
#   when train is not among the suites),
# FASTVAE_GPU_DEVICE_CAP_S (reparam_device's cap, default 200 s),
#   e.g. FASTVAE_GPU_SUITES=convkl FASTVAE_GPU_TESTS_SET=none FASTVAE_GPU_EXTRAS="" FASTVAE_GPU_BUDGET_S=560
#   for the spatial VAE's suite alone (its GPU tests, FASTVAE_GPU_TESTS_K=convkl, in another call),
#   FASTVAE_GPU_SUITES=onnx_cuda FASTVAE_GPU_TESTS_SET=onnx FASTVAE_GPU_EXTRAS="" for ONNX decoders on the
#   CUDA provider: it needs onnxruntime-gpu, which the H200 image lacks (its onnxruntime is the CPU
#   build, and the GPU wheel is far over the 64 MiB that can be carried): there both are skipped
#   at once, saying so,
# FASTVAE_GPU_MAX_TIME (pytest-benchmark --benchmark-max-time, default 0.25 s),
# FASTVAE_GPU_STRICT=1 (exit 1 when a step failed; default: always exit 0),
# FASTVAE_GPU_SKIP_INSTALL=1 (skip step 1, e.g. in a copy of the tree that must not be installed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
REPO=$(pwd)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1
PYTEST=("$PY" -m pytest)

BUDGET=${FASTVAE_GPU_BUDGET_S:-480}
MAXT=${FASTVAE_GPU_MAX_TIME:-0.25}
T0=$SECONDS
FAILED=()
if [ -z "${FASTVAE_GIT_COMMIT:-}" ] && ! git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  echo "run.sh: warning: no .git here and FASTVAE_GIT_COMMIT is not set: every result will say commit" \
       "'unknown' (set FASTVAE_GIT_COMMIT=\$(git describe --always --dirty --abbrev=40) where the checkout is)" >&2
fi
SKIPPED=()

# remaining CAP: seconds a step may take: min(CAP, what is left of the budget - 30 s reserve:
# a suite stopped at its cap gets 30 s to write its JSON)
remaining() {
  local left=$((BUDGET - (SECONDS - T0) - 30))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
# step NAME CMD...: run a guarded step; never stops the script. A step whose command exits 77
# (automake's "skipped"; pytest uses 1-5) was skipped (out of the time budget, or nothing it
# needs is here): not a failure.
step() {
  local name=$1; shift
  local t=$SECONDS
  echo
  echo "##### step: $name  (t=$((SECONDS - T0)) s)"
  "$@"
  local rc=$?
  if [ "$rc" -eq 0 ]; then echo "##### ok: $name ($((SECONDS - t)) s)"
  elif [ "$rc" -eq 77 ]; then echo "##### SKIPPED step: $name"; SKIPPED+=("$name")
  else echo "##### FAILED step: $name (exit $rc, $((SECONDS - t)) s)"; FAILED+=("$name"); fi
}
# out_of_budget: say so; the step counts as skipped
out_of_budget() { echo "out of time budget"; return 77; }
has_cuda_provider() {
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null
}

has_cuda=0
slug=unknown
read -r has_cuda slug < <("$PY" benchmarks/common.py cuda-slug 2>/dev/null) || true
[ "$has_cuda" = 1 ] || has_cuda=0
[ -n "$slug" ] || slug=unknown
if [ "$has_cuda" = 1 ]; then
  DEST=${1:-benchmarks/results/$slug}
else
  DEST=${1:-${TMPDIR:-/tmp}/fastvae-gpu-run/$slug}
fi
mkdir -p "$DEST" || exit 2
DEST=$(cd "$DEST" && pwd)
HELD_FILES=$(find "$DEST" -mindepth 1 -maxdepth 1 | head -n 1)  # packing sweeps only a folder of its own
LOG=$DEST/run.log

# ---------------------------------------------------------------------------------------- 1
SITE=${FASTVAE_SITE:-/tmp/fastvae-site}
if [ -d "$SITE" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi

install_missing() {
  # module:distribution pairs the GPU image may lack (it has `lightning`, not lightning_fabric)
  local pair mod dist whl
  # litdata (prepared datasets, the streaming suite) and the modules it imports
  for pair in lightning_utilities:lightning_utilities lightning_fabric:lightning_fabric \
      litdata:litdata boto3:boto3 botocore:botocore s3transfer:s3transfer jmespath:jmespath \
      dateutil:python_dateutil six:six requests:requests urllib3:urllib3 idna:idna \
      certifi:certifi charset_normalizer:charset_normalizer; do
    mod=${pair%%:*}; dist=${pair#*:}
    if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$mod') is None)" 2>/dev/null; then
      echo "have $mod"; continue
    fi
    whl=$(ls .whl/"$dist"-*.whl 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$whl" ]; then echo "no wheel for $mod in .whl/ (run benchmarks/fetch_wheels.sh and carry .whl)"; return 1; fi
    echo "installing $whl into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$whl" || return 1
    case ":${PYTHONPATH:-}:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}";; esac
  done
}

install_optional() {
  # diffusers for the convkl suite's AutoencoderKL comparison, from .whl/optional: only modules the
  # image lacks, --no-deps (never torch, numpy or Pillow); failing here only skips that comparison
  local pair mod dist whl
  for pair in diffusers:diffusers huggingface_hub:huggingface_hub hf_xet:hf_xet httpx:httpx \
              httpcore:httpcore safetensors:safetensors regex:regex importlib_metadata:importlib_metadata \
              zipp:zipp anyio:anyio h11:h11 click:click; do
    mod=${pair%%:*}; dist=${pair#*:}
    "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$mod') is None)" 2>/dev/null && continue
    whl=$(ls .whl/optional/"$dist"-*.whl 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$whl" ]; then echo "no wheel for $mod in .whl/optional: the diffusers comparison will skip"; return 0; fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$whl" \
      || { echo "could not install $whl: the diffusers comparison will skip"; return 0; }
    case ":${PYTHONPATH:-}:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}";; esac
  done
  "$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers does not import: its comparison will skip"
}

use_checkout() {
  # Nothing to install: with the checkout on PYTHONPATH, fastvae/__init__.py finds kernels/ and
  # export/ as fastvae.kernels and fastvae.export, and the GPU image's torch stays untouched.
  case ":${PYTHONPATH:-}:" in *":$REPO:"*) ;; *) export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}";; esac
  (cd / && "$PY" -c "import fastvae, fastvae.kernels, fastvae.export; print('fastvae from', fastvae.__file__)")
}

# ---------------------------------------------------------------------------------------- 2
print_versions() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" benchmarks/common.py info | tee "$DEST/machine.json"  # the device of a run without suites
}

# ---------------------------------------------------------------------------------------- 3
gpu_tests() {
  local cap; cap=$(remaining "${FASTVAE_GPU_TESTS_CAP_S:-180}")
  [ "$cap" -ge 20 ] || out_of_budget || return
  # files in value order (pytest keeps the command line's order of files, not of a folder's):
  # the fused kernel's tests first, the slow compiled/FSDP trainings last, then any other file
  # with GPU tests
  local paths=(tests/test_kernel_gpu.py tests/test_kernel_reparam_kl.py tests/test_reliability.py
               tests/test_onnx_cuda.py tests/test_convkl.py tests/test_fsdp.py tests/test_compile.py) f
  for f in $(grep -l "mark.gpu" tests/test_*.py); do
    [[ " ${paths[*]} " == *" $f "* ]] || paths+=("$f")
  done
  local expr=""
  case "${FASTVAE_GPU_TESTS_SET:-all}" in
    all) ;;
    kernel) paths=(tests/test_kernel_gpu.py tests/test_kernel_reparam_kl.py) ;;
    unreached) expr="fsdp_fp16_on_cuda or seed_on_the_device or cuda_graph_replays or captured_unseeded" ;;
    onnx) has_cuda_provider || [ "$has_cuda" = 0 ] \
            || { echo "onnxruntime here has no CUDAExecutionProvider (onnxruntime-gpu): nothing to test"; return 77; }
          paths=(tests/test_onnx_cuda.py) ;;
    none) echo "no GPU tests (FASTVAE_GPU_TESTS_SET=none)"; return 0 ;;
    *) echo "unknown FASTVAE_GPU_TESTS_SET=${FASTVAE_GPU_TESTS_SET} (all, kernel, unreached, onnx, none)"; return 2 ;;
  esac
  if [ -n "${FASTVAE_GPU_TESTS_K:-}" ]; then
    if [ -n "$expr" ]; then expr="($expr) and ($FASTVAE_GPU_TESTS_K)"; else expr=$FASTVAE_GPU_TESTS_K; fi
  fi
  local select=()
  [ -n "$expr" ] && select=(-k "$expr")
  timeout -s INT -k 20 "$cap" "${PYTEST[@]}" -m gpu "${paths[@]}" "${select[@]}" -q -p no:cacheprovider -rs --timeout=120
  local rc=$?
  [ "$rc" -eq 5 ] && { echo "no gpu tests collected"; return 0; }
  return "$rc"
}

# The fused op's device time (CUDA-graph replays, L2 flushed), host time and copy fraction:
# the fused kernel's device-time figures. The script rewrites its JSON after every record.
reparam_device() {
  local cap; cap=$(remaining "${FASTVAE_GPU_DEVICE_CAP_S:-200}")
  [ "$cap" -ge 40 ] || out_of_budget || return
  if [ "$has_cuda" = 1 ]; then
    timeout -s INT -k 20 "$cap" "$PY" benchmarks/reparam_kl_device.py "$DEST/reparam_kl_device.json" --budget-s $((cap - 30))
  else
    echo "(no CUDA: host-time smoke run on the CPU, to check the script; recorded as smoke)"
    FASTVAE_BENCH_SMOKE=1 timeout -s INT -k 20 "$cap" "$PY" benchmarks/reparam_kl_device.py "$DEST/reparam_kl_device.json" --smoke
  fi
}

# Steps stop with SIGINT at their cap: pytest then still writes the JSON of what finished.
bench_suite() {
  local name=$1 file=benchmarks/test_bench_$1.py cap rc default_cap=150
  [ "$name" = train ] && default_cap=210  # two torch.compile warm-ups (MLP, conv) come first
  # four compiled cases (convkl 64/256, MLP, conv: two compilations each), diffusers at 64 and
  # 256: the 2026-11-30 H200 run did not finish in 330 s; give it a call of its own
  [ "$name" = convkl ] && default_cap=540
  cap=$(remaining "${FASTVAE_GPU_SUITE_CAP_S:-$default_cap}")
  [ "$cap" -ge 20 ] || out_of_budget || return
  if [ "$name" = onnx_cuda ] && [ "$has_cuda" = 1 ] && ! has_cuda_provider; then
    echo "onnxruntime here has no CUDAExecutionProvider (onnxruntime-gpu): nothing to measure"; return 77
  fi
  local args=(--benchmark-json="$DEST/$name.json" --benchmark-sort=name --timeout=90)
  # each test's figures are appended to $name.extra.jsonl as it ends (kept by a SIGKILL too);
  # a failure prints its traceback at once; after SIGINT pytest gets 30 s to write the JSON
  local -x FASTVAE_BENCH_EXTRA_INFO="$DEST/$name.extra.jsonl" FASTVAE_BENCH_EAGER_FAILURES=1
  rm -f "$DEST/$name.extra.jsonl"  # this run's figures only
  if [ "$has_cuda" = 1 ]; then
    args+=(--benchmark-max-time="$MAXT" --benchmark-min-rounds=5 --benchmark-warmup=on
           --benchmark-warmup-iterations=3)
    timeout -s INT -k 30 "$cap" "${PYTEST[@]}" "$file" -q -p no:cacheprovider -rs "${args[@]}"
  else
    echo "(no CUDA: smoke mode, tiny sizes, one round)"
    args+=(--benchmark-max-time=0.000001 --benchmark-min-rounds=1)
    FASTVAE_BENCH_SMOKE=1 timeout -s INT -k 30 "$cap" "${PYTEST[@]}" "$file" -q -p no:cacheprovider -rs "${args[@]}"
  fi
  rc=$?
  [ -s "$DEST/$name.json" ] || echo "suite $name: no JSON written (all skipped?)"
  [ "$rc" -eq 5 ] && return 0
  return "$rc"
}

precision_check() {
  local cap; cap=$(remaining 120)
  [ "$cap" -ge 30 ] || out_of_budget || return
  if [ "$has_cuda" = 1 ]; then
    timeout -s INT -k 20 "$cap" "$PY" benchmarks/precision_check.py "$DEST/precision.json"
  else
    echo "(no CUDA: 2 epochs only, to check the pipeline; recorded as smoke)"
    FASTVAE_BENCH_SMOKE=1 timeout -s INT -k 20 "$cap" "$PY" benchmarks/precision_check.py "$DEST/precision.json" --epochs 2
  fi
}

tile_sweep() {
  local cap; cap=$(remaining 110)
  [ "$cap" -ge 30 ] || out_of_budget || return
  if [ "$has_cuda" = 1 ]; then
    timeout -s INT -k 20 "$cap" "$PY" benchmarks/gpu/tile_sweep.py "$DEST/tile_sweep.json" --budget-s $((cap - 25))
  else
    echo "(no CUDA: interpreted smoke sweep, to check the script)"
    TRITON_INTERPRET=1 timeout -s INT -k 20 "$cap" "$PY" benchmarks/gpu/tile_sweep.py "$DEST/tile_sweep.json" --smoke
  fi
}

render_results() {
  "$PY" benchmarks/report.py render "$DEST" || return 1
  local stored=benchmarks/results/$slug
  if [ "$has_cuda" = 1 ] && [ -d "$stored" ] && [ "$(cd "$stored" && pwd)" != "$DEST" ]; then
    echo "--- compared with the stored results in $stored:"
    "$PY" benchmarks/report.py compare "$stored" "$DEST" --threshold 0.10 || true
  fi
}

# Settings that change GPU timing (an interpreted kernel, serialised launches, compile debug
# output, no caching allocator): unset on CUDA before anything is measured, saying so; every
# JSON records their values (common.device_info()["env"], the same list: common.TIMING_ENV).
TIMING_ENV=(TRITON_INTERPRET CUDA_LAUNCH_BLOCKING TORCH_COMPILE_DEBUG PYTORCH_NO_CUDA_MEMORY_CACHING)
clear_timing_env() {
  local v
  for v in "${TIMING_ENV[@]}"; do
    if [ -n "${!v+set}" ]; then echo "unset $v (was '${!v}'): it changes GPU timing"; unset "$v"; fi
  done
}

main() {
  echo "fastvae GPU run: repo $REPO, python $PY, cuda=$has_cuda, out $DEST, budget ${BUDGET}s, date $(date -u +%FT%TZ)"
  [ "$has_cuda" = 1 ] && clear_timing_env
  if [ "${FASTVAE_GPU_SKIP_INSTALL:-0}" = 1 ]; then
    echo "##### step 1: skipped (FASTVAE_GPU_SKIP_INSTALL=1)"
  else
    step "1a install missing wheels" install_missing
    case " ${FASTVAE_GPU_SUITES:-convkl} " in *" convkl "*) step "1a' optional wheels (diffusers)" install_optional;; esac
    step "1b fastvae from this checkout" use_checkout
  fi
  step "2 versions" print_versions
  step "3a gpu tests (pytest -m gpu tests)" gpu_tests
  local extras=" ${FASTVAE_GPU_EXTRAS-reparam_device precision tile_sweep} "
  local suites s
  if [ "${FASTVAE_GPU_SUITES:-}" = none ]; then suites=""
  elif [ -n "${FASTVAE_GPU_SUITES:-}" ]; then suites=$FASTVAE_GPU_SUITES
  else
    # most valuable first, in case the budget runs out: the trainer figure (then the bf16 check
    # and the fused op's device time), the GPU suites, the CPU-side ones (decoder sampling,
    # latency and serving measure the CPU) last; the kernel suite keeps what it finishes
    suites=""
    for s in train convkl reparam_kl streaming onnx_cuda; do [ -f "benchmarks/test_bench_$s.py" ] && suites="$suites $s"; done
    for f in benchmarks/test_bench_*.py; do
      [ -e "$f" ] || continue
      s=$(basename "$f" .py); s=${s#test_bench_}
      case " $suites " in *" $s "*) ;; *) suites="$suites $s";; esac
    done
  fi
  [ -n "${suites// /}" ] || echo "no benchmark suites selected"
  local device_done=0
  if [[ "$extras" == *" reparam_device "* ]] && [[ " $suites " != *" train "* ]]; then
    step "3b fused reparam+KL device time" reparam_device; device_done=1
  fi
  for s in $suites; do
    step "3c bench $s" bench_suite "$s"
    if [ "$s" = train ] && [[ "$extras" == *" precision "* ]]; then
      step "3d bf16 vs fp32 -ELBO (digits)" precision_check
    fi
    if [ "$s" = train ] && [[ "$extras" == *" reparam_device "* ]] && [ "$device_done" = 0 ]; then
      step "3b fused reparam+KL device time" reparam_device; device_done=1
    fi
  done
  [[ "$extras" == *" tile_sweep "* ]] && step "4 kernel tile sweep (tuning data)" tile_sweep
  if [ "$PACK" = 1 ]; then
    echo; echo "##### step 5: render skipped: the outputs are packed for 'report.py store', which renders"
  else
    step "5 render results" render_results
  fi
  echo
  echo "##### done in $((SECONDS - T0)) s; results in $DEST:"
  ls -l "$DEST"
  [ ${#SKIPPED[@]} -gt 0 ] && echo "##### SKIPPED steps: ${SKIPPED[*]}"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "##### FAILED steps: ${FAILED[*]}"
    [ "${FASTVAE_GPU_STRICT:-0}" = 1 ] && return 1
  else
    echo "##### no step failed"
  fi
  return 0
}

# packed by default on a CUDA machine given an OUT folder; never the stored results folder (the
# default OUT), whose older files the packing would sweep away
if [ -z "${1:-}" ]; then PACK=0; else PACK=${FASTVAE_GPU_PACK:-$has_cuda}; fi
case "$DEST/" in "$REPO"/benchmarks/results/*) PACK=0;; esac
if [ "$PACK" = 1 ] && [ -n "$HELD_FILES" ]; then
  echo "not packing: $DEST held files before this run (give an empty OUT folder to pack)"; PACK=0
fi
main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
if [ "$PACK" = 1 ]; then
  # one archive (and the log beside it): the device tool returns 8 files from $OUT at most
  # written outside DEST, then moved in: an archive growing inside the folder tar reads
  # changes that folder ("tar: .: file changed as we read it", exit 1: nothing was packed)
  packed=$(mktemp "${TMPDIR:-/tmp}/fastvae-results.XXXXXX") \
    && tar czf "$packed" -C "$DEST" --exclude results.tgz . \
    && chmod 644 "$packed" && mv "$packed" "$DEST/results.tgz" \
    && (cd "$DEST" && find . -maxdepth 1 -type f ! -name results.tgz ! -name run.log -delete) \
    && echo "packed $(tar tzf "$DEST/results.tgz" | grep -c -v '/$') files into $DEST/results.tgz" \
    || { echo "could not pack $DEST"; rm -f "${packed:-}"; rc=1; }
fi
exit "$rc"
