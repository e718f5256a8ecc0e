# Two commands for a fresh clone: `make serve` (the main job: the offline app on Ray Serve)
# and `make test`. Both create .venv on first use and install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SECRET_FILE := output/dev-jwt-secret
SUB ?= demo

.PHONY: serve token demo test bench postgres browser cluster-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision must be a matching pair (open_clip needs torchvision).
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

# A development JWT secret, made once; export SCENEREF_JWT_SECRET to use your own.
$(SECRET_FILE):
	mkdir -p output
	$(PYTHON) -c "import secrets; print(secrets.token_urlsafe(48))" > $(SECRET_FILE)

# The offline app (no GPU, no API key) on http://127.0.0.1:8000. Ctrl-C stops it.
serve: $(STAMP) $(SECRET_FILE)
	$(BIN)/sceneref offline-models --dir output/offline-models > /dev/null
	SCENEREF_JWT_SECRET=$${SCENEREF_JWT_SECRET:-$$(cat $(SECRET_FILE))} RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 \
		$(BIN)/serve run serve_config.offline.yaml

# A token for the app above: TOKEN=$$(make -s token SUB=alice)
token: $(STAMP) $(SECRET_FILE)
	@SCENEREF_JWT_SECRET=$${SCENEREF_JWT_SECRET:-$$(cat $(SECRET_FILE))} $(BIN)/sceneref token --sub $(SUB)

# One generation in this process, without Ray (offline providers, tiny scorer models).
demo: $(STAMP)
	$(BIN)/sceneref generate --offline --prompt "Artisan coffee that starts your morning right" \
		--duration 15 --variations 4 --iterations 4 --threshold 30 --output output/demo --keep-traces

# PostgreSQL server binaries for the job-store tests (the tests start a throwaway cluster on a
# free port; testkit/postgres.py finds initdb under /usr/lib/postgresql or on PATH): Debian's
# package, installed when missing and we are root; else those tests skip (a failure with CI set).
postgres:
	@{ ls /usr/lib/postgresql/*/bin/initdb || command -v initdb; } > /dev/null 2>&1 \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null \
			&& { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } \
			|| echo "PostgreSQL binaries not found and cannot install them: the PostgreSQL tests will skip"; }

# Chromium for the viewer's browser tests (tests/serve/test_viewer_browser.py drives it with
# Playwright's `executable_path`; Playwright's own browser download is not used): Debian's package.
browser:
	@command -v chromium > /dev/null \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null \
			&& { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
			|| echo "chromium not found and cannot install it: the browser tests will fail; install Debian's chromium"; }

# The simulated multi-node cluster test runs in its own process beside the rest (it starts its own
# Ray cluster); its output is printed after the main run. -rs prints every skip with its reason;
# with CI set, a skip for a missing PostgreSQL, SeaweedFS or Chromium fails (tests/conftest.py).
TEST_ENV := RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
test: $(STAMP) postgres browser
	@mkdir -p output
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs -p no:cacheprovider -m multinode > output/test-multinode.log 2>&1 & multi=$$!; \
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs -p no:cacheprovider -m "not multinode"; main=$$?; \
	wait $$multi; multinode=$$?; \
	echo "--- multi-node cluster test (output/test-multinode.log) ---"; tail -n 40 output/test-multinode.log; \
	test $$main -eq 0 -a $$multinode -eq 0

# The cluster manifests against their schemas (KubeRay CRD, Serve, the launcher) and each other;
# after changing serve_config.yaml, `$(BIN)/python -m cluster.rayservice` regenerates serveConfigV2.
cluster-check: $(STAMP)
	$(BIN)/python -m cluster.check
