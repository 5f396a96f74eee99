# uniembed — every target installs what it needs into .venv first (pip only; torch comes from this machine's disk).
VENV   ?= .venv
PY     := $(VENV)/bin/python
UE     := $(VENV)/bin/uniembed
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install system-deps test test-fast lint demo model bench fuzz soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the end-to-end browser test (nothing downloads a browser of its own).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian chromium for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "WARNING: could not install chromium; browser tests will skip"; \
	  else echo "WARNING: chromium missing and not root; browser tests will skip"; fi; }

lint: install
	$(PY) -m ruff check src tests scripts
	$(VENV)/bin/lint-imports

test: install system-deps lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything but the tests marked slow (the model protocol, DDP, the wheel, the browser...): minutes, not ten.
test-fast: install lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(UE) demo

model: install
	$(UE) model

bench: install
	$(UE) bench

# Property-based fuzz of image decoding and the upload endpoint at full size (make test runs a few hundred cases).
fuzz: install
	$(PY) -m uniembed_lab.fuzz --cases 2000

# ~10 min: mixed good/bad uploads from several clients + `index --add` at the same time (SOAK_ARGS="--minutes 3").
SOAK_ARGS ?=
soak: install
	$(PY) -m uniembed_lab.soak $(SOAK_ARGS)

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
