# Two commands for a fresh clone: `make demo` (the main job, offline) and `make test`.
# Both create .venv on first use and install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision must be a matching pair (open_clip needs torchvision).
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sceneref generate --offline --prompt "Artisan coffee that starts your morning right" \
		--duration 15 --variations 4 --iterations 4 --threshold 30 --output output/demo --keep-traces

test: $(STAMP)
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider
