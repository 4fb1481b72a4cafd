# ragcache: `make run` (the demo, with admin, Celery worker and beat) and `make test`.
# Both bootstrap a fresh machine: .venv, requirements, migrations.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-aggregate load clean

$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found); set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

run: $(STAMP)
	@bash scripts/run.sh

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# make bench: every row of the performance table in one run (~4 minutes; docs/performance.md). Groups:
# BENCH_ARGS="--only sync|async|remote|http|profile|callgrind" (comma-separated). Needs
# redis-server and taskset; the HTTP rows need wrk, callgrind needs valgrind and gcc
# (Debian: apt-get install redis-server wrk valgrind gcc).
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || echo "note: wrk is not installed (apt-get install wrk): the HTTP rows will be skipped"
	$(PY) bench/hotpath.py $(BENCH_ARGS)

bench-aggregate: $(STAMP)
	$(PY) bench/aggregation.py $(BENCH_ARGS)

load: $(STAMP)
	$(PY) bench/load.py $(LOAD_ARGS)

clean:
	rm -rf .run/redis .run/*.pid .run/*.log
