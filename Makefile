# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel on a machine without a GPU, the CUDA build on a GPU machine: same pin either way,
# installed before the package so the package's `torch` requirement is already satisfied.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python pipelines/distill.py --config configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs build *.egg-info
