# lorafleet: `make demo` runs the main job on the embedded model, `make test` runs the suite.
# Both install first. Installing is idempotent: a second run does nothing unless pyproject.toml changed.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED = 0

.PHONY: install native demo test lint typecheck clean-venv

install: $(STAMP) native

$(STAMP): pyproject.toml
	@echo "installing lorafleet and its stack into $(VENV) (about 3 minutes the first time)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The native trainer (edge_client/native, C++ on the executorch wheel's runtime): built when cmake and a C++
# compiler are present, skipped with the reason otherwise. Incremental: a second run compiles nothing.
native: $(STAMP)
	@.ci/build-native

demo: install
	$(BIN)/lorafleet demo

# Two pytest workers (CI has 2 cores); a test file stays on one worker, so its module fixtures are built once.
# The 20 slowest tests are listed at the end: where the suite's time goes.
TEST_WORKERS ?= 2
test: install
	@echo "running the test suite on $(TEST_WORKERS) workers (40-60 minutes on 2 cores; a dot per test)"
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

lint: install
	$(BIN)/ruff check .

# mypy reads the installed namespace from a symlink view (build/typecheck/lorafleet); .ci/typecheck lays it out.
typecheck: install
	MYPY=$(BIN)/mypy .ci/typecheck

clean-venv:
	rm -rf $(VENV)
