# Developer shortcuts; the README's two commands work without make.
VENV := .venv/bin

.PHONY: install demo test lint bench chaos

install:
	bash .ci/install

demo: install
	$(VENV)/vllm-fleet demo

test: install
	$(VENV)/python -m pytest

lint: install
	$(VENV)/ruff check . && $(VENV)/ruff format --check . && $(VENV)/python -m mypy

bench: install
	$(VENV)/python -m bench

chaos: install
	CHAOS_REPORT=docs/reliability.md $(VENV)/python -m pytest tests/chaos -q
