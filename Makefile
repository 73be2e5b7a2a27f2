# The README's two commands: `make demo` and `make test`. Both install what is missing first.
.PHONY: setup demo test lint typecheck unit

VENV := .venv/bin

setup:
	./scripts/setup-host.sh

demo: setup
	$(VENV)/python -m devtools.demo

lint:
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

typecheck:
	$(VENV)/mypy .

test: setup lint typecheck
	$(VENV)/pytest

# Fast loop while developing: no libvirtd guests.
unit:
	$(VENV)/pytest --ignore=tests/test_end_to_end.py
