# Two commands from a fresh clone: `make demo` and `make test`. Each installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: install demo test lint typecheck test-pg15 bench bench-quick bench-deps stress soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/orchestrator demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy orchestrator
	$(BIN)/pytest $(PYTEST_ARGS)

# The same suite on PostgreSQL 15 from Debian's server binaries (started as the postgres user).
test-pg15: $(STAMP)
	bash .ci/with-pg15.sh $(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy orchestrator

# Benchmarks (not part of `make test`): ~30 minutes on 2 cores; figures go to bench/results/
# and docs/benchmarks.md. The pg_repack comparison needs Debian's PostgreSQL 15 and
# postgresql-15-repack (`make bench-deps`, as root); without them it is reported unavailable.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# A smoke run with small sizes (a few minutes); writes bench/results/quick/ only.
bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

bench-deps:
	test -x /usr/lib/postgresql/15/bin/pg_repack || \
		(apt-get update && apt-get install -y postgresql-15 postgresql-15-repack)

# Randomized SIGKILLs and reruns under load (tests/stress.py): STRESS_RUNS seeds (60) from a
# base seed (the clock, or ORCHESTRATOR_STRESS_BASE); ORCHESTRATOR_SEED=<seed> replays one run.
stress: $(STAMP)
	mkdir -p bench/results && rm -f bench/results/stress.jsonl
	ORCHESTRATOR_STRESS_RUNS=$(or $(STRESS_RUNS),60) \
	ORCHESTRATOR_STRESS_BASE=$(or $(ORCHESTRATOR_STRESS_BASE),$(shell date +%s)) \
	ORCHESTRATOR_STRESS_LOG=bench/results/stress.jsonl \
	$(BIN)/pytest tests/test_stress.py -k random_point $(PYTEST_ARGS); status=$$?; \
	$(BIN)/python tests/stress.py summary bench/results/stress.jsonl bench/results/stress.json \
	&& exit $$status

# The Cogito sample moved, cut over, rolled back and forward under load for SOAK_MINUTES (10).
soak: $(STAMP)
	$(BIN)/python tests/soak.py --minutes $(or $(SOAK_MINUTES),10) --out bench/results/soak.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
