#!/usr/bin/env bash
# Download the pure-Python wheels that the GPU image lacks into .whl/ (git-ignored).
# The device machine has no network: carry the folder with the run (carry: [".whl"]) and
# benchmarks/gpu/run.sh installs from it with `pip install --no-index --no-deps`, only what is
# missing there (the image has `lightning` and lightning-utilities, not lightning-fabric).
# Versions: those of this checkout's dev environment; pip --no-deps fetches no dependencies, so
# every missing one must be named here (lightning-fabric needs fsspec, packaging, torch,
# typing-extensions, lightning-utilities: all but lightning-fabric are in the image; litdata's
# metadata also names torchvision, tifffile and obstore, which it imports only for features
# fastvae does not use: never installed, so the image's torch stays as it is).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
# The streaming library litdata (prepared datasets) and what it imports; gpu/run.sh installs
# only those whose module the image lacks (it has filelock, which torch needs).
WHEELS=("lightning-fabric==${LIGHTNING_FABRIC_VERSION:-2.6.6}"
        "lightning-utilities==${LIGHTNING_UTILITIES_VERSION:-0.15.3}"
        "litdata==${LITDATA_VERSION:-0.2.76}"
        boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
        python-dateutil==2.9.0.post0 six==1.17.0 requests==2.34.2 urllib3==2.8.0 idna==3.20
        certifi==2026.10.19.post1 charset-normalizer==3.5.3)
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${WHEELS[@]}"
# optional, for the convkl suite's diffusers comparison: diffusers and the libraries it needs
# besides torch, numpy and Pillow (the GPU image has those; run.sh installs only what is missing)
OPTIONAL=("diffusers==${DIFFUSERS_VERSION:-0.42.1}" "huggingface-hub<2" hf-xet httpx httpcore safetensors regex
          importlib-metadata zipp anyio h11 click)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl/optional "${OPTIONAL[@]}" || echo "optional wheels (diffusers) not fetched: its comparison will skip"
ls -l .whl .whl/optional
