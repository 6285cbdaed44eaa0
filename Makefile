# The two commands a new machine needs:
#   make serve   install from Pipfile.lock, train and register a model if none is in Production, run Gunicorn
#   make test    install the dev (and spark) dependencies too and run the whole suite (what .ci/run does)
#   make test-container   build the image and test the compose stack on a real Docker engine (.ci/run does it too)
#   make test-browser     drive Swagger UI at /docs in headless Chromium against the service (.ci/run does it too);
#                         installs Debian's chromium and chromium-driver with apt-get when they are missing
#   make audit   pip-audit over every package Pipfile.lock pins (.ci/run does it too)

PYTHON ?= python3
PIPENV := $(PYTHON) -m pipenv
export PIPENV_VENV_IN_PROJECT := 1
export PIPENV_VERBOSITY := -1
export PIPENV_NOSPIN := 1
export MLFLOW_DISABLE_TELEMETRY := true
VENV := .venv

.PHONY: serve train test test-container test-browser audit lint lint-docker format clean

$(VENV)/.synced: Pipfile.lock
	$(PYTHON) -m pipenv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet pipenv
	$(PIPENV) sync
	touch $@

# The dev sync adds the `spark` category (pyspark and a Java runtime, for spark_scoring.py and its tests); the plain
# sync, `make serve` and the image install [packages] only.
DEV_CATEGORIES := packages dev-packages spark
$(VENV)/.synced-dev: Pipfile.lock
	$(PYTHON) -m pipenv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet pipenv
	$(PIPENV) sync --categories="$(DEV_CATEGORIES)"
	touch $(VENV)/.synced $@

serve: $(VENV)/.synced
	$(PIPENV) run python train.py --if-missing
	$(PIPENV) run gunicorn --config gunicorn.conf.py

train: $(VENV)/.synced
	$(PIPENV) run python train.py

# mypy twice: bench/ has scripts named like the root's (batch.py, train.py), so it is checked on its own.
lint: lint-docker
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench

lint-docker: $(VENV)/.synced-dev
	$(VENV)/bin/hadolint --failure-threshold warning Dockerfile

test: lint
	PIPENV_DONT_LOAD_ENV=1 $(VENV)/bin/python -m pytest --ignore=tests/container --ignore=tests/browser

# Needs a Docker engine, docker compose or docker-compose, and python:3.11-slim (pulled, or the stand-in .ci/run builds).
test-container: lint-docker
	PIPENV_DONT_LOAD_ENV=1 $(VENV)/bin/python -m pytest tests/container -o log_cli=true --log-cli-level=INFO

# Chromium and its driver are Debian's (chromium, chromium-driver): apt-get installs them when either program is
# missing (sudo when not root). Selenium downloads no browser or driver of its own.
BROWSER_PROGRAMS := /usr/bin/chromium /usr/bin/chromedriver
test-browser: $(VENV)/.synced-dev
	@for program in $(BROWSER_PROGRAMS); do [ -x "$$program" ] || missing="$$missing $$program"; done; \
	if [ -n "$$missing" ]; then \
		echo "missing:$$missing; installing chromium and chromium-driver"; \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi
	PIPENV_DONT_LOAD_ENV=1 $(VENV)/bin/python -m pytest tests/browser

# Known vulnerabilities in the locked packages, dev and spark ones included. The exported lock carries every hash, so
# nothing is resolved or installed (--disable-pip). --strict fails on a package the vulnerability service
# cannot answer for: without it, an unreachable service reads "No known vulnerabilities found".
# A finding that cannot be fixed by upgrading the package in Pipfile.lock goes here as --ignore-vuln ID, with why.
AUDIT_IGNORE :=
audit: $(VENV)/.synced-dev
	$(PIPENV) requirements --categories="$(DEV_CATEGORIES)" --hash | grep -v '^-e ' > $(VENV)/audit-requirements.txt  # not the project itself
	$(VENV)/bin/pip-audit --strict --require-hashes --disable-pip --progress-spinner off $(AUDIT_IGNORE) \
		-r $(VENV)/audit-requirements.txt

format: $(VENV)/.synced-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
