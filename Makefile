# uniembed — every target installs what it needs into .venv first (pip only; torch comes from this machine's disk).
VENV   ?= .venv
PY     := $(VENV)/bin/python
UE     := $(VENV)/bin/uniembed
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install system-deps test lint demo model model-finetune bench clean

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
	$(PY) -m ruff check src tests

test: install system-deps lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(UE) demo

model: install
	$(UE) model

# The same recipe plus a whole-backbone fine-tune in every training run (~25 min instead of ~1.5 min):
# docs/experiments.md, finding 20. Not the default: the project's design keeps the backbone frozen.
model-finetune: install
	$(UE) model --config configs/model_finetune.yaml --out artifacts/model_finetune --work artifacts/work_finetune

bench: install
	$(UE) bench

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
