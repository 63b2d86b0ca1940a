# The two commands: `make run` sets everything up and starts a chat; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-fast bench clean
setup:
	@scripts/setup.sh

run: setup
	$(VENV)/bin/llmrun chat

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# everything but the tests that load large shape-true models
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_serve.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
