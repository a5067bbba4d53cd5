# Two commands on a fresh clone: `make run` trains the embedded default, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Torch first and pinned: a looser requirement pulls a multi-GB CUDA build on CPU machines.
TORCH  ?= torch==2.13.0
# DeepSpeed JIT-compiles its C++ ops once; keep the build cache with the venv so it is reused.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install run test clean

$(BIN)/lrpt: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/lrpt

install: $(BIN)/lrpt

run: install
	$(BIN)/lrpt train

# One torch thread per process: multi-process tests share 2 cores, and oversubscribed
# threads make gloo and small matmuls crawl (5-10x slower).
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
