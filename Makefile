# The README's two commands: `make demo` and `make test`. Both install what is missing first.
.PHONY: setup demo test lint typecheck unit bench bench-quick ui-screenshot cli-capture real-guest

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

# Most tests wait (on a guest, a timeout, a worker's retry) rather than compute: four processes share
# two cores well. Each real-guest test group stays in one process, on the guest it booted.
TEST_WORKERS ?= 4

test: setup lint typecheck
	$(VENV)/pytest -n $(TEST_WORKERS) --dist loadgroup

# Fast loop while developing: no QEMU guests (marked guest or real_guest by tests/conftest.py) and no
# whole fleets (marked fleet); the fleet's scheduling itself runs, as a pure plan (tests/test_fleet_plan.py).
unit:
	$(VENV)/pytest -n 4 -m "not guest and not real_guest and not fleet"

# The real Debian guest of tests/real_guest/, built from Debian's packages once per machine
# (about two minutes; the tests build it themselves on first use too).
real-guest:
	$(VENV)/python -m devtools.real_guest

# Benchmarks: every figure as a ratio against a reference run in the same script.
# `make bench` is the full run behind docs/benchmarks.md's table; `make bench-quick` is a smaller one.
BENCHES := bench.download bench.prepare bench.downtime bench.orchestration bench.scale bench.preflight \
	bench.status_load bench.fleet bench.real_guest bench.pools bench.copy_mode bench.snapshot bench.startup

bench: setup
	@for b in $(BENCHES); do $(VENV)/python -m $$b || exit 1; done

bench-quick: setup
	@for b in $(BENCHES); do BENCH_QUICK=1 $(VENV)/python -m $$b || exit 1; done

# A screenshot of the demo's rebuild in the Temporal Web UI (after `make demo`).
ui-screenshot:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	$(VENV)/python -m devtools.ui_screenshot

# docs/cli-progress.md: `rebuild start --wait` and `rebuild watch` in tmux during a real download.
cli-capture: setup
	$(VENV)/python -m devtools.tmux_capture
