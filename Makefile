# `make test` and `make serve` work on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Reinstall whenever the lock or pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cat requirements.lock requirements-nodeps.lock pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install test serve clean cxx

install: $(STAMP) cxx

# The CPU attention kernel (kernels/cpu/) is compiled on first use with g++; without one the
# server falls back to the slower jnp attention.
cxx:
	@command -v g++ >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null; } || \
		echo "g++ not installed: CPU attention falls back to the jnp reference"

# Exactly the versions in requirements.lock (hash-checked), then the packages taken without
# their declared dependencies (requirements-nodeps.lock, hash-checked: lm-eval), then Tessera
# itself without resolving again, so a fresh machine gets what the suite last passed with.
$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements-nodeps.lock
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

# -- licence audit, SBOM and release (issue 22) ----------------------------------------------
# The release tools (cyclonedx-bom, build) live in their own locked environment, so that
# they are neither in the served environment nor in its SBOM.
RELEASE_VENV := .venv-release
RPY := $(RELEASE_VENV)/bin/python
RELEASE_STAMP := $(RELEASE_VENV)/.installed-$(shell cat requirements-release.lock | sha1sum | cut -c1-12)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
SBOM := dist/tessera-serve-$(VERSION).cdx.json

$(RELEASE_STAMP): requirements-release.lock
	test -x $(RPY) || $(PYTHON) -m venv $(RELEASE_VENV)
	$(RPY) -m pip install --quiet --require-hashes -r requirements-release.lock
	rm -f $(RELEASE_VENV)/.installed-*
	touch $@

.PHONY: lock-release audit audit-extras sbom release
lock-release:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip-tools
	$(VENV)/bin/pip-compile --quiet --allow-unsafe --generate-hashes --strip-extras --no-emit-index-url \
		--no-emit-find-links --output-file=requirements-release.lock requirements-release.in

# Every distribution of the locked environment (core + test extra) and of the release tools is
# MIT, BSD or Apache-2.0, or reviewed in ops/licence_exceptions.toml. dist/licences.md is the report.
audit: install $(RELEASE_STAMP)
	mkdir -p dist
	$(PY) -m ops.licence_audit --title "locked environment (.venv: core + test extra)" --report dist/licences-main.md
	$(RPY) -m ops.licence_audit --title "release tools (.venv-release)" --report dist/licences-release-tools.md
	cat dist/licences-main.md dist/licences-release-tools.md > dist/licences.md

# The extras the lock does not install, resolved from PyPI without installing (pip's installation
# report carries each distribution's metadata). Needs the network. cuda12 is left out: NVIDIA's
# CUDA wheels are proprietary (LicenseRef-NVIDIA-Proprietary), a decision for a person (BUILD_NOTES).
AUDIT_EXTRAS ?= train perf replay
audit-extras: install
	mkdir -p dist
	for extra in $(AUDIT_EXTRAS); do \
		$(PY) -m pip install --quiet --dry-run --ignore-installed --report dist/pip-report-$$extra.json ".[$$extra]" && \
		$(PY) -m ops.licence_audit --title "extra $$extra (resolved, not installed)" \
			--pip-report dist/pip-report-$$extra.json --report dist/licences-extra-$$extra.md || exit 1; \
	done

# CycloneDX 1.6 JSON of the locked environment, checked against the CycloneDX schema.
sbom: install $(RELEASE_STAMP)
	mkdir -p dist
	$(RELEASE_VENV)/bin/cyclonedx-py environment --pyproject pyproject.toml --spec-version 1.6 \
		--output-format JSON --output-reproducible --output-file $(SBOM) $(PY)
	$(RPY) -m ops.sbom_check $(SBOM) --require tessera-serve jax flax litestar

# The wheel, the sdist, the SBOM, the licence report and their checksums in dist/; then
# `gh release create` with them where gh and credentials are there (PUBLISH=1), else a dry run.
release: audit sbom
	rm -f dist/*.whl dist/*.tar.gz dist/SHA256SUMS
	$(RPY) -m build --no-isolation --wheel --sdist --outdir dist .
	cd dist && sha256sum tessera_serve-$(VERSION)-py3-none-any.whl tessera_serve-$(VERSION).tar.gz \
		tessera-serve-$(VERSION).cdx.json licences.md > SHA256SUMS
	$(RPY) -m ops.release --dist dist --version $(VERSION) $(if $(PUBLISH),--publish)
