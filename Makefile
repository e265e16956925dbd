# The two commands of the README:
#   make example   the main job: an ETL workflow on a real Celery worker, events printed live
#   make test      the tests: tox's default list (matrix corners, integration, dashboard in a browser, Celery compatibility gate, lint, typing)
VENV ?= .venv
PYTHON ?= python3

# pyenv's shims answer only for the versions PYENV_VERSION lists: list the default one
# first, then every other 3.9-3.13, so that tox finds each interpreter of the matrix.
ifneq ($(shell command -v pyenv 2>/dev/null),)
PYENV_VERSION ?= $(shell pyenv version-name 2>/dev/null | cut -d: -f1):$(shell pyenv versions --bare --skip-aliases 2>/dev/null | grep -E '^3\.(9|1[0-3])\.[0-9]+$$' | paste -sd: -)
export PYENV_VERSION
endif

.PHONY: example test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

example: $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e .
	$(VENV)/bin/python examples/etl.py

test: $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet "tox>=4.11"
	scripts/ensure-brokers
	scripts/ensure-chromium
	$(VENV)/bin/tox
