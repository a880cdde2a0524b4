# Two commands: `make run` starts the dashboard, `make test` runs the whole suite. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501

.PHONY: run test install install-dev checkpoints bench clean

$(BIN)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(BIN)/.installed
install-dev: $(BIN)/.installed-dev

run: $(BIN)/.installed
	$(BIN)/streamlit run app.py --server.port $(PORT)

test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q

checkpoints: $(BIN)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/make_checkpoints.sh

bench: $(BIN)/.installed
	$(BIN)/python -m vae bench

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
