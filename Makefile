# Two commands set everything up: `make demo` and `make test`.
# Both create .venv when missing and install hespotex with all extras (uv when available, pip otherwise).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hespotex-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench clean

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

demo: install
	$(VENV)/bin/hespotex demo

# Tests, then the tutorials and notebooks executed top to bottom on small settings (HESPOTEX_QUICK=1).
test: install
	HF_HUB_OFFLINE=1 HESPOTEX_QUICK=1 $(PY) -m pytest --nbmake --nbmake-timeout=1200 $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check hespotex tests benchmarks

format: install
	$(PY) -m ruff format hespotex tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-output test-artifacts tutorials/tutorial-output notebooks/tutorial-output
