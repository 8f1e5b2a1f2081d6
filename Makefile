# Two commands for a newcomer: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist): the multi-process scenarios run one at a time on one of them
# (one xdist group, tests/conftest.py), the in-process tests share both. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
XDIST  := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)

.PHONY: venv lint browser test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

## make lint: ruff (style, bugs) and mypy --strict (actors/ transport/ persistence/ supervisors/); config in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## make browser: the system package the browser test drives (Debian's chromium; Playwright cannot download one
## here; EV_CHROMIUM=/path/to/chromium uses another)
browser:
	@[ -n "$$EV_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for the browser test (apt-get)"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || { \
	    echo "Could not install chromium: install it with 'apt-get install -y chromium' and run make test again"; exit 1; }; }

## make test: lint, then the whole suite (real broker, real sockets, real SQLite, real processes)
test: lint browser
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

## make test-fast: lint, then everything but the multi-process scenarios
test-fast: lint browser
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

## make demo: a whole network on this machine, no typing needed
demo: $(STAMP)
	$(VENV)/bin/evcharging up --cps 3 --drivers 2 --services 10 --supply-seconds 8 --power-kw 150

## make bench: speed and scale figures (prints a table; does not gate CI); REPEAT=3 for min/median/max
REPEAT ?= 1
bench: $(STAMP)
	$(PY) -m bench.run_all --repeat $(REPEAT)

clean:
	rm -rf $(VENV) run .pytest_cache .mypy_cache .ruff_cache *.egg-info
