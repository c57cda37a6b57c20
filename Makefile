# Quick start: `make demo` (fine-tune on the bundled data) and `make test` (the whole suite).
# Both create .venv on first use and install the package with everything it and its tests need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup browser demo test lint bench bench-torch clean

setup: $(STAMP)

# The report page's test opens it in Debian's headless Chromium, driven through ChromeDriver.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -q && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Fine-tunes EfficientNet-Lite0 (real ImageNet weights, offline) on the bundled Fashion-MNIST
# sample and compares it with the same network trained from scratch on the same split.
demo: setup
	$(BIN)/finetune backbones
	$(BIN)/finetune train examples/data/fashion_mnist --config examples/demo.toml \
		--out runs/demo --overwrite --compare-scratch

# Two test processes (pytest-xdist), each test file whole in one of them: on 2 cores the suite
# took half the time of one process (719 s against 1,465 s), as much of it waits on one core
# (decoding, conversions, subprocesses, Python). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: setup browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

bench: setup
	$(BIN)/python benchmarks/throughput.py

# Issue 7's side-by-side table: finetune's training and inference steps against PyTorch loops
# on the same network (PyTorch is a benchmark-only dependency: the bench extra).
bench-torch: setup
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python benchmarks/throughput_vs_torch.py

clean:
	rm -rf runs .pytest_cache
