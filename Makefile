# `make test` and `make serve` work on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Reinstall whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
DEMO_MODEL := .cache/demo-model
DEMO_PROMPT ?= The server reads a request and

.PHONY: install test serve clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q

# Until the HTTP server lands, `make serve` generates from a small random checkpoint
# built on first run (the trained demo model replaces it).
serve: install $(DEMO_MODEL)/config.json
	$(VENV)/bin/tessera generate --model $(DEMO_MODEL) --prompt "$(DEMO_PROMPT)" --max-tokens 32

$(DEMO_MODEL)/config.json:
	$(PY) -m tests.helpers.tiny_checkpoint $(DEMO_MODEL)

clean:
	rm -rf $(VENV) .cache .pytest_cache
