# didomi-marketo: `make demo` and `make test` work from a fresh clone with nothing installed by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The cloud storage emulators the tests start (moto's S3 server, gcp-storage-emulator) get their own
# venv: moto[server] wants the newest botocore, s3fs's aiobotocore pins an older one.
EMU_VENV  ?= .venv-emulators
EMU_STAMP := $(EMU_VENV)/.installed

.PHONY: install emulators demo test lint bench samples clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

$(EMU_STAMP): tests/emulators.txt
	$(PYTHON) -m venv $(EMU_VENV)
	$(EMU_VENV)/bin/pip install --quiet --quiet --upgrade pip
	$(EMU_VENV)/bin/pip install --quiet --quiet -r tests/emulators.txt
	touch $(EMU_STAMP)

## emulators: the S3 and GCS servers the cloud storage tests start on 127.0.0.1 (cached by a stamp)
emulators: $(EMU_STAMP)

## demo: start the local Marketo sandbox, sync sample_exports/ into it, show the leads and the report
demo: install
	bash scripts/demo.sh

## test: unit, property and end-to-end tests (the sandbox and the storage emulators run on 127.0.0.1)
test:
	$(MAKE) --no-print-directory -j2 install emulators  # two venvs, built side by side
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy src/didomi_marketo
	$(BIN)/lint-imports

## bench: one table: delivery at Marketo's real limits, vs a marketorestpython script, vs DuckDB
bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/bench.py

## samples: regenerate sample_exports/ (deterministic)
samples:
	$(PYTHON) scripts/make_samples.py

clean:
	rm -rf $(VENV) $(EMU_VENV) demo-report demo-reconcile demo-state .pytest_cache .hypothesis
