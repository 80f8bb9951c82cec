# Quick start: `make train` (set up + train on the embedded simulator), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=
export SDL_VIDEODRIVER := offscreen

.PHONY: setup train test lint typecheck docs config-keys bench clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "convoy needs Python >= 3.11 (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, from its pinned build; the constraint keeps every later install from moving it.
	$(PY) -m pip install --quiet torch==2.13.0
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)
	@deploy/scripts/ensure-redis.sh

train: setup
	$(VENV)/bin/convoy train $(ARGS)

test: setup
	@deploy/scripts/ensure-prometheus.sh
	$(VENV)/bin/pytest --durations=15 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# The documentation site (docs/, mkdocs.yml) into site/; tests/test_docs.py builds it --strict.
docs: setup
	$(PY) -m mkdocs build --strict

# Regenerate docs/reference/config.md's key table after a config key changes.
config-keys: setup
	PYTHON=$(PY) deploy/scripts/update-config-keys.sh

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache .ruff_cache *.egg-info
