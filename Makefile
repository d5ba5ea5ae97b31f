# `make run`: set up everything and run the main job.  `make test`: set up everything and run the tests.
# `make results`: the paper's comparisons at small scale (about 3 hours on 2 cores, resumable) -> docs/results.md;
# `make results-quick`: the same pipeline with tiny budgets (a few minutes) -> runs/reproduce-quick/results.md.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench results results-quick clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m titans demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

results: $(STAMP)
	$(PY) -m titans data prepare
	$(PY) -m titans reproduce

results-quick: $(STAMP)
	$(PY) -m titans data prepare
	$(PY) -m titans reproduce --quick --force --out runs/reproduce-quick

bench: $(STAMP)
	$(PY) benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) runs
