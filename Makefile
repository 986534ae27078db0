# Two commands on a fresh machine with Python 3.11 and make: `make run` and `make test`.
# torch goes in first, from TORCH_SPEC, and is pinned while the rest installs, so pip never
# replaces the CPU build with a multi-GB CUDA one. GPU users: make TORCH_SPEC="torch==2.13.0" \
#   PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu128" (or any spec they like).
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
PY := $(VENV)/bin/python
OUT ?= runs/main
PYTEST_ARGS ?=

.PHONY: run test unit integration lint clean venv bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	@touch $@

run: venv
	$(VENV)/bin/osmd main --out $(OUT)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest -q -m "not integration" $(PYTEST_ARGS)

integration: venv
	$(PY) -m pytest -q -m integration $(PYTEST_ARGS)

# The CPU benchmarks of issue 9 (tables and JSON under benchmarks/results/, figures in
# benchmarks/RESULTS.md); `make bench BENCH_ARGS=--quick` is a smoke run of each.
BENCH_ARGS ?=
bench: venv
	$(PY) benchmarks/train_throughput.py $(BENCH_ARGS)
	$(PY) benchmarks/deploy_latency.py $(BENCH_ARGS)
	$(PY) benchmarks/jmmd_cost.py $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check osmd_ray tests benchmarks

clean:
	rm -rf $(VENV) runs
