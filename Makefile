# Everything runs in a local virtual environment (.venv) that this Makefile creates.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m hf_mousse train demo-cpu

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
