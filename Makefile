# Two commands on a fresh machine: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= .mtrank/demo-logs
DAYS   ?= 8
ROWS   ?= 50000
SEED   ?= 7
EVAL_DATE ?= 2026-11-08
CANDIDATES ?= .mtrank/demo-candidates
SCORES ?= .mtrank/scores

.PHONY: venv train test test-fast bench bench-quick bench-venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, exact pin, from the local CPU wheel: nothing may pull a CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia'; then echo "nvidia-* packages were installed: some dependency asked for another torch" >&2; exit 1; fi
	touch $(STAMP)

train: venv
	$(VENV)/bin/mtrank generate --out $(DATA) --days $(DAYS) --rows-per-day $(ROWS) --seed $(SEED) --users 200000 --items 100000
	$(VENV)/bin/mtrank validate --data $(DATA)
	$(VENV)/bin/mtrank daily --date $(EVAL_DATE) --data $(DATA)
	$(VENV)/bin/mtrank generate --candidates --out $(CANDIDATES) --date $(EVAL_DATE) --requests 2000 --per-request 100 --seed $(SEED) --users 200000 --items 100000
	$(VENV)/bin/mtrank exposures --data $(DATA) --date $(EVAL_DATE) --out $(SCORES)/exposures-$(EVAL_DATE).parquet
	$(VENV)/bin/mtrank score --model models:/mtrank-demo@champion --candidates $(CANDIDATES) --date $(EVAL_DATE) --exposures $(SCORES)/exposures-$(EVAL_DATE).parquet --out $(SCORES)/dt=$(EVAL_DATE)/ranked.parquet

test: venv
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests   # every tier; 2 workers, modules whole, longest first (tests/conftest.py)

test-fast: venv   # the development tier: no end-to-end job, server or torchrun test (`-m slow` runs those)
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" tests

bench: venv bench-venv
	$(PY) -m bench.run_all

bench-quick: venv bench-venv
	$(PY) -m bench.run_all --quick

# Separate venv for the peer trainers (torch-rechub, deepctr-torch), torch kept at 2.13.0 CPU.
bench-venv:
	bash bench/peers/setup_venv.sh

clean:
	rm -rf .mtrank .pytest_cache
