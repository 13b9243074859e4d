# vita-corpus: `make demo` builds the demo corpus, `make test` runs the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= demo_out

.PHONY: install demo test lint bench bench-flow clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: the Prefect flow (ephemeral API), tasks on a local Ray.
demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/vita-corpus demo --out $(OUT) --flow

# The report test renders the HTML in Debian's headless Chromium.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_shard_writer.py
	$(PY) bench/bench_transforms.py
	$(PY) bench/bench_train.py

# The flow against the plain build (about 45 minutes on 2 cores).
bench-flow: $(STAMP)
	$(PY) bench/bench_flow.py

clean:
	rm -rf $(VENV) $(OUT) bench/out .pytest_cache .ruff_cache *.egg-info
