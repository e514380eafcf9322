.PHONY: install test test-all lint format bench report convert

install:
	pip install torch==2.13.0 && pip install -e ".[dev]"

test:
	python -m pytest -q

test-all:
	python -m pytest -q -m "slow or not slow"

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .

convert:
	dit-graft convert recipes/digits-lit.yaml

bench:
	python scripts/bench_convert.py && python scripts/bench_operators.py && python scripts/bench_kernels.py

report: convert
	python scripts/digits_report.py --student runs/digits-lit
