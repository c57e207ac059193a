#!/usr/bin/env bash
# Download the pure-Python wheels that the GPU image lacks into .whl/ (git-ignored).
# The device machine has no network: carry the folder with the run (carry: [".whl"]) and
# benchmarks/gpu/run.sh installs from it with `pip install --no-index --no-deps`, only what is
# missing there (the image has `lightning` and lightning-utilities, not lightning-fabric).
# Versions: those of this checkout's dev environment; pip --no-deps fetches no dependencies, so
# every missing one must be named here (lightning-fabric needs fsspec, packaging, torch,
# typing-extensions, lightning-utilities: all but lightning-fabric are in the image).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
WHEELS=("lightning-fabric==${LIGHTNING_FABRIC_VERSION:-2.6.6}"
        "lightning-utilities==${LIGHTNING_UTILITIES_VERSION:-0.15.3}")
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${WHEELS[@]}"
# optional, for the convkl suite's diffusers comparison: diffusers and the libraries it needs
# besides torch, numpy and Pillow (the GPU image has those; run.sh installs only what is missing)
OPTIONAL=("diffusers==${DIFFUSERS_VERSION:-0.42.1}" huggingface-hub hf-xet httpx2 httpcore2 safetensors regex
          importlib-metadata zipp anyio h11 click)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl/optional "${OPTIONAL[@]}" || echo "optional wheels (diffusers) not fetched: its comparison will skip"
ls -l .whl .whl/optional
