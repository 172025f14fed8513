# Development entry points: a venv in .venv, one native build (ours), incremental rebuilds.
#   make demo   a short generation with the default model
#   make test   the test suite
# Extra CMake options (GGML_CUDA=on, ...) go through CMAKE_ARGS, as with llama-cpp-python.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.arkv-installed
SOURCES := pyproject.toml CMakeLists.txt vendor/pin.json $(wildcard patches/*.patch) \
           $(wildcard arkv_local/*.py arkv_local/*/*.py arkv_local/csrc/*)

.PHONY: install demo test lint clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The README's pip route (one pip command), without build isolation so that build/ persists.
# CMAKE_ARGS reaches both builds: llama-cpp-python's (its llama.cpp off: pure Python) and ours
# (the one patched libllama). --no-cache-dir: pip would cache that library-less llama-cpp-python
# and give it to the next plain `pip install llama-cpp-python==0.3.36`.
$(STAMP): $(BIN)/python $(SOURCES)
	@command -v $${CXX:-c++} >/dev/null || { echo "error: no C++ compiler (c++) found: install g++ or clang" >&2; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "scikit-build-core>=0.10" cmake ninja pytest ruff
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF $$CMAKE_ARGS" $(BIN)/python -m pip install \
	  --no-cache-dir --no-build-isolation ".[test]"
	$(BIN)/python -c "import arkv_local; arkv_local.default_model_path()"  # fetch once, offline after
	touch $@

demo: install
	$(BIN)/python -m arkv_local.chat --prompt "In two sentences, what is a KV cache?"

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check arkv_local tests examples

clean:
	rm -rf build $(VENV) vendor/llama.cpp
