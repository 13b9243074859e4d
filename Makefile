# vita-corpus: `make demo` builds the demo corpus, `make test` runs the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= demo_out

.PHONY: install demo test lint bench bench-flow bench-scale clean chromium coqui-venv gpu-prepare

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The coqui-tts backend in a second venv: every torchaudio build on the package index links
# CUDA libraries, so none loads beside the CPU torch of .venv. This stack works on CPU-only
# machines (about 3 minutes and 7.6 GB, once). The pins go on the project's install line too,
# so that resolving its own `torch>=2.3` cannot move torch off 2.9.1.
COQUI_VENV  ?= .venv-coqui
COQUI_PY    := $(COQUI_VENV)/bin/python
COQUI_STAMP := $(COQUI_VENV)/.installed
COQUI_PINS  := torch==2.9.1 torchaudio==2.9.1 torchcodec==0.8.1 coqui-tts==0.28.0

$(COQUI_STAMP): pyproject.toml
	$(PYTHON) -m venv $(COQUI_VENV)
	$(COQUI_PY) -m pip install -q --upgrade pip
	$(COQUI_PY) -m pip install -q $(COQUI_PINS) six
	$(COQUI_PY) -m pip install -q -e '.[coqui,dev]' $(COQUI_PINS)
	$(COQUI_PY) -c "import torch, TTS.api; assert torch.__version__.startswith('2.9.1'), torch.__version__"
	touch $(COQUI_STAMP)

coqui-venv: $(COQUI_STAMP)

# The main job on the embedded default: the Prefect flow (ephemeral API), tasks on a local Ray.
demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/vita-corpus demo --out $(OUT) --flow

# The report test renders the HTML in Debian's headless Chromium.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) $(COQUI_STAMP) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --ignore=tests/coqui
	# The coqui backend's tests, in the coqui venv (tests/coqui).
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(COQUI_PY) -m pytest -q tests/coqui

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_shard_writer.py
	$(PY) bench/bench_transforms.py
	$(PY) bench/bench_train.py

# The flow against the plain build (about 45 minutes on 2 cores).
bench-flow: $(STAMP)
	$(PY) bench/bench_flow.py

# How cost grows: the scale corpus at 10k, 100k and 1M records (hours on 2 cores; see
# bench/RESULTS.md). SIZES=10000,100000 for a shorter run.
SIZES ?= 10000,100000,1000000
bench-scale: $(STAMP)
	$(PY) bench/bench_scale.py --sizes $(SIZES) --cases tiling

clean:
	rm -rf $(VENV) $(COQUI_VENV) $(OUT) bench/out .pytest_cache .ruff_cache *.egg-info

# What the trainer's GPU check (bench/gpu_checks.sh, run on a machine with a CUDA GPU) carries:
# built shards and the wheels that machine lacks, in .gpu/.
gpu-prepare: $(STAMP)
	PY=$(PY) bash bench/gpu_prepare.sh
