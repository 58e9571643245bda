# Two commands set everything up: `make demo` and `make test`.
# Both create .venv when missing and install hespotex with all extras (uv when available, pip otherwise).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hespotex-installed
TEST_STAMP := $(VENV)/.hespotex-test-extras
PYTEST_ARGS ?=

.PHONY: install browser demo test lint format bench clean

$(STAMP): pyproject.toml
	@if $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv; then \
		[ -x $(PY) ] || $(PYTHON) -m uv venv $(VENV) --python $(PYTHON); \
		$(PYTHON) -m uv pip install --python $(PY) --compile-bytecode -e ".[all]"; \
	else \
		[ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -e ".[all]"; \
	fi
	@touch $(STAMP)

install: $(STAMP)

# The tests also exercise the DeepSpot-M peer with its own package (PolyForm Noncommercial code, kept out of `all`).
$(TEST_STAMP): $(STAMP)
	@if $(PYTHON) -m uv --version >/dev/null 2>&1; then \
		$(PYTHON) -m uv pip install --python $(PY) --compile-bytecode -e ".[all,deepspotm]"; \
	else \
		$(PY) -m pip install -e ".[all,deepspotm]"; \
	fi
	@touch $(TEST_STAMP)

demo: install
	$(VENV)/bin/hespotex demo

# Browser tests drive Debian's Chromium through Playwright (never `playwright install`): install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
		echo "Chromium is missing: installing Debian's chromium and chromium-driver (apt-get)"; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; \
	} || { echo "make test: could not install Chromium (run 'apt-get install -y chromium chromium-driver' as root), needed by the browser tests" >&2; exit 1; }

# Tests, then the tutorials and notebooks executed top to bottom on small settings (HESPOTEX_QUICK=1).
test: $(TEST_STAMP) browser
	HF_HUB_OFFLINE=1 HESPOTEX_QUICK=1 $(PY) -m pytest --nbmake --nbmake-timeout=1200 $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check hespotex tests benchmarks

format: install
	$(PY) -m ruff format hespotex tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-output test-artifacts tutorials/tutorial-output notebooks/tutorial-output
