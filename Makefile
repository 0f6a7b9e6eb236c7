# didomi-marketo: `make demo` and `make test` work from a fresh clone with nothing installed by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench samples clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: start the local Marketo sandbox, sync sample_exports/ into it, show the leads and the report
demo: install
	bash scripts/demo.sh

## test: unit, property and end-to-end tests (the sandbox runs on 127.0.0.1)
test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy src/didomi_marketo
	$(BIN)/lint-imports

## bench: delivery at Marketo's (compressed) limits, and local pipeline speed and memory
bench: install
	$(BIN)/python bench/bench.py

## samples: regenerate sample_exports/ (deterministic)
samples:
	$(PYTHON) scripts/make_samples.py

clean:
	rm -rf $(VENV) demo-report .pytest_cache .hypothesis
