# `make test` and `make serve` work on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Reinstall whenever the lock or pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install test serve clean cxx

install: $(STAMP) cxx

# The CPU attention kernel (kernels/cpu/) is compiled on first use with g++; without one the
# server falls back to the slower jnp attention.
cxx:
	@command -v g++ >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null; } || \
		echo "g++ not installed: CPU attention falls back to the jnp reference"

# Exactly the versions in requirements.lock (hash-checked), then Tessera itself without
# resolving again, so a fresh machine gets what the suite last passed with.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# Refresh requirements.lock from pyproject.toml's ranges (the core and the test extra).
# Commit the result only after `make test` passes with it.
.PHONY: lock
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip-tools
	$(VENV)/bin/pip-compile --quiet --allow-unsafe --extra=test --generate-hashes --strip-extras \
		--no-emit-index-url --no-emit-find-links --upgrade --output-file=requirements.lock pyproject.toml

test: install test-services
	$(PY) -m pytest -q

# What the tests start or call themselves: redis-server, etcd (etcd-server), curl and chromium (Debian's;
# Playwright drives /usr/bin/chromium, its own browser download is not used), and oidc-provider under node
# (npm, into tests/integration/oidc/node_modules). Skipped when already there.
OIDC_DIR := tests/integration/oidc
.PHONY: test-services
test-services: $(OIDC_DIR)/node_modules/.installed
	@command -v redis-server >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
	@command -v etcd >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null; }
	@command -v curl >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl >/dev/null; }
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

$(OIDC_DIR)/node_modules/.installed: $(OIDC_DIR)/package-lock.json
	@command -v npm >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; }
	cd $(OIDC_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The OpenAI-compatible server on 127.0.0.1:8000 with the default model: models/demo once it
# exists, else a small random checkpoint that `tessera serve` builds on first run.
# Talk to it with `.venv/bin/tessera chat`.
serve: install
	$(VENV)/bin/tessera serve --host 127.0.0.1 --port 8000

# The worker's gRPC stubs (serving/rpc/*_pb2*.py) are checked in; this remakes them from the .proto
# with the locked grpcio-tools (run from the root, so the stubs import each other as serving.rpc.*).
.PHONY: protos
protos: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. serving/rpc/tessera.proto

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Retrain the shipped demo model (models/demo) from its corpus with seed 0: about 25 minutes
# on a 2-core machine; see models/demo/MODEL_CARD.md.
.PHONY: demo-model
demo-model: install
	$(PY) -m pip install --quiet -e '.[train]'
	nice -n 10 $(PY) -m models.demo_training.train --seed 0 --out models/demo
