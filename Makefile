# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo serve test lint install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/sidecar demo

# Worker + HTTP API (+ search) + emulator in one process, on what `make demo` indexed.
serve: $(BIN)/.installed
	SIDECAR_DATA_DIR=$${SIDECAR_DATA_DIR:-.sidecar/demo} SIDECAR_API_TOKENS=$${SIDECAR_API_TOKENS:-dev-token} \
	  $(BIN)/sidecar serve --emulator

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# What CI runs before the tests: lint, format and strict types (config in pyproject.toml).
lint: $(BIN)/.installed
	$(BIN)/ruff check worker api tests bench migrations
	$(BIN)/ruff format --check worker api tests bench migrations
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .sidecar .pytest_cache
