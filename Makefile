# fastvae: `make demo` sets up .venv and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastvae-installed
RUN    ?= runs/demo
# the streaming library; --no-deps: its metadata asks for torchvision, which would replace the
# CPU torch (pyproject's "stream" extra lists what it does import)
LITDATA ?= 0.2.76

.PHONY: demo test bench setup clean

setup: $(STAMP)

# torch first: on a machine without CUDA, the CPU wheel 2.13.0 (any other requirement pulls a
# multi-GB CUDA build); with CUDA present, pip resolves pyproject's range as usual.
# --no-compile, then one byte-compile of the environment on every core: pip compiles one file
# at a time (torch + the dev extras: 184 s -> 162 s of set-up on the 2-core dev machine). The
# .pyc files are needed: where PYTHONDONTWRITEBYTECODE is set, every test process would
# otherwise compile what it imports (~24 s instead of ~10 s to import the stack).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet --no-compile torch==2.13.0; fi
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	$(PY) -m pip install --quiet --no-compile --no-deps 'litdata==$(LITDATA)'
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastvae train --data digits --model mlp --latent-dim 8 --hidden-dim 512 \
	    --likelihood bernoulli --epochs 50 --batch-size 64 --lr 1e-3 --seed 0 --out $(RUN) --overwrite
	$(VENV)/bin/fastvae evaluate $(RUN) --iwae-k 1000 --json
	$(VENV)/bin/fastvae report $(RUN) --iwae-k 1000
	$(VENV)/bin/fastvae export $(RUN) --out $(RUN)/decoder.onnx --fp16 --int8
	$(VENV)/bin/fastvae sample $(RUN)/decoder.onnx -n 64 --seed 0 --out $(RUN)/onnx_samples.png

# two pytest processes (pytest-xdist), tests handed out one at a time as workers free up: the
# suite is mostly one-thread work and waiting on child processes, so two halve its wall time
# on a 2-core machine; `make test TEST_WORKERS=0` runs it in one process. One OpenMP thread per
# process (unless OMP_NUM_THREADS says otherwise): the workers and the ranks and commands they
# start share two cores, and oversubscribed OpenMP threads spin (6 min 25 s of tests instead of
# 7 min 4 s, same tree, same evening)
TEST_WORKERS ?= 2

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: $(STAMP)
	bash benchmarks/run_suites.sh
	$(PY) benchmarks/report.py summary benchmarks/results/*/ --readme README.md

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
