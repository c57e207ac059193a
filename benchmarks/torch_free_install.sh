#!/usr/bin/env bash
# The torch-free install of the sampler and the HTTP service, checked in a fresh virtualenv:
# installs fastvae with --no-deps plus only what sampling and serving need, proves torch is not
# there, samples with the CLI, serves a decoder and gets a sample over HTTP, and measures the
# install's size (vs torch's) and the cold start to the first sample.
#
#   bash benchmarks/torch_free_install.sh [OUT_JSON]     (default: print the JSON only)
#
# Needs the dev .venv (to export a decoder to serve) and PyPI. Exit status 0 when every check
# passed. Servers listen on 127.0.0.1 only and are stopped with SIGTERM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEV_PY=${PYTHON:-.venv/bin/python}
OUT_JSON=${1:-}
# what a torch-free sampler + service needs (pyproject's `serve` extra plus the core few)
RUNTIME_DEPS=(numpy onnxruntime pillow "fastapi>=0.110" "uvicorn[standard]>=0.29")

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -TERM "$server_pid"; wait "$server_pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== a decoder to serve (exported with the dev venv)"
"$DEV_PY" - "$work/decoder.onnx" <<'EOF'
import sys, torch
from fastvae.export import export_decoder
from fastvae.models import build_model
torch.manual_seed(0)
model = build_model({"model": "mlp", "data_shape": [1, 8, 8], "latent_dim": 8, "hidden_dim": 512})
export_decoder(model, sys.argv[1], check_batches=(3,))
EOF

echo "== fresh venv: fastvae --no-deps + ${RUNTIME_DEPS[*]}"
python3 -m venv "$work/venv"
VPY=$work/venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip
"$DEV_PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/wheel" . >/dev/null
"$VPY" -m pip install --quiet --no-deps "$work"/wheel/fastvae-*.whl
"$VPY" -m pip install --quiet --no-warn-conflicts "${RUNTIME_DEPS[@]}"  # fastvae's torch stays missing
if "$VPY" -c "import torch" 2>/dev/null; then echo "FAILED: torch is installed in the torch-free venv"; exit 1; fi

site=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
dev_site=$("$DEV_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mb() { du -sbc "$@" 2>/dev/null | tail -1 | awk '{printf "%.0f", $1 / 1e6}'; }
free_mb=$(mb "$site")
torch_mb=$(mb "$dev_site"/torch "$dev_site"/torch-*.dist-info "$dev_site"/functorch "$dev_site"/torchgen \
              "$dev_site"/sympy "$dev_site"/mpmath "$dev_site"/networkx "$dev_site"/triton)
dev_mb=$(mb "$dev_site")

echo "== cold start: fastvae sample -n 1 (new process, nothing cached in it)"
t0=$(date +%s.%N)
"$work/venv/bin/fastvae" sample "$work/decoder.onnx" -n 1 --seed 0 --out "$work/one.npy" >/dev/null
t1=$(date +%s.%N)
sample_s=$(echo "$t1 - $t0" | bc -l)

echo "== cold start: fastvae serve -> first /sample response"
t0=$(date +%s.%N)
"$work/venv/bin/fastvae" serve "$work/decoder.onnx" --host 127.0.0.1 --port 0 > "$work/serve.out" 2>"$work/serve.err" &
server_pid=$!
port=""
for _ in $(seq 600); do  # up to 60 s for the readiness line
  port=$(sed -n 's#^fastvae serve: listening on http://127.0.0.1:\([0-9]*\)$#\1#p' "$work/serve.out")
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.err"; echo "FAILED: the server exited"; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "FAILED: no readiness line"; exit 1; }
"$VPY" - "$port" "$work/one.npy" <<'EOF'
import http.client, io, json, sys
import numpy as np
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=60)
conn.request("POST", "/sample", json.dumps({"n": 1, "seed": 0}), {"Content-Type": "application/json"})
response = conn.getresponse()
assert response.status == 200, response.read()
x = np.load(io.BytesIO(response.read()))
np.testing.assert_array_equal(x, np.load(sys.argv[2]))  # the CLI's sample, over HTTP
EOF
t1=$(date +%s.%N)
serve_s=$(echo "$t1 - $t0" | bc -l)
kill -TERM "$server_pid"
rc=0; wait "$server_pid" || rc=$?
server_pid=""
[ "$rc" = 0 ] || { cat "$work/serve.err"; echo "FAILED: the server exited $rc after SIGTERM"; exit 1; }
# outside the checkout, whose fastvae/ folder would shadow the installed package
(cd "$work" && "$VPY" -c "import sys, fastvae.export.http_service, fastvae.cli; assert 'torch' not in sys.modules")

# the commit as the suites record it (benchmarks/common.py: FASTVAE_GIT_COMMIT, else git)
commit=$("$DEV_PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from common import git_commit; c = git_commit(); print(c["id"] + ("-dirty" if c["dirty"] else ""))')
json=$(printf '{"date": "%s", "git_commit": "%s", "cpu": "%s", "python": "%s", "onnxruntime": "%s", "torch_free_site_packages_MB": %s, "torch_triton_and_deps_MB": %s, "dev_venv_site_packages_MB": %s, "cold_start_sample_cli_s": %.2f, "cold_start_serve_first_sample_s": %.2f}' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$commit" "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" \
  "$("$VPY" -c 'import platform; print(platform.python_version())')" \
  "$("$VPY" -c 'import onnxruntime; print(onnxruntime.__version__)')" \
  "$free_mb" "$torch_mb" "$dev_mb" "$sample_s" "$serve_s")
echo "$json"
if [ -n "$OUT_JSON" ]; then echo "$json" > "$OUT_JSON"; fi
echo "torch-free install: ok"
