# The README's commands: `make demo`, `make test`, `make test-fast` and `make lint`. Each creates .venv
# when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel on a machine without a GPU, the CUDA build on a GPU machine: same pin either way,
# installed before the package so the package's `torch` requirement is already satisfied.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,lint]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python pipelines/distill.py --config configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest tests

# The edit loop: every test that starts no Ray (markers in pyproject.toml; tests/conftest.py marks
# the users of a Ray fixture and fails an unmarked test that starts Ray).
test-fast: install
	$(BIN)/python -m pytest tests -m "not ray and not e2e and not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pocl_ray

clean:
	rm -rf $(VENV) runs build *.egg-info .mypy_cache .ruff_cache
