# Targets a new user needs; README.md names `make install`, `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= all,dev

.PHONY: install system-deps test lint demo demo-quadratic demo-idds bench clean

install: $(BIN)/hepopt

$(BIN)/hepopt: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $@

# Real components the integration tests start (DESIGN.md §6): a private PostgreSQL server.
system-deps:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then echo "postgresql: present"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; fi

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

# The main job: a small MLPF study (examples/mlpf_small), minutes on a 2-core machine.
demo: install
	$(BIN)/hepopt run examples/mlpf_small/task.json --workers 2

demo-quadratic: install
	$(BIN)/hepopt run examples/quadratic/task.json --workers 4

demo-idds: install
	$(BIN)/python examples/quadratic/idds_loop.py

bench: install
	$(BIN)/python benchmarks/steering_latency.py
	$(BIN)/python benchmarks/steering_quality.py
	$(BIN)/python benchmarks/orchestrator_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
