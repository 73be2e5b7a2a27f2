"""The fleet's schedule (workflows/fleet_plan.py) driven as the workflow drives it, in milliseconds.

``drive`` is the workflow's loop without Temporal: start what the plan picks, end the oldest running
rebuild (rolled back if it is one of ``failing``), begin the next batch, carry the plan into a new run
when the history is full. The few workflow tests in tests/test_fleet.py run it for real.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workflows.activity_models import HostInventory, InventoryEntry
from workflows.fleet_models import FleetLimits, FleetTarget, InstanceState, Selection
from workflows.fleet_plan import FleetPlan, Step, Then


def listing(hosts: int, each: int, image: str | None = None) -> dict[str, HostInventory]:
    """``hosts`` hosts named kvm-H, each with ``each`` instances named vm-H-I."""

    def host(h: int) -> HostInventory:
        names = [f"vm-{h}-{i}" for i in range(each)]
        return HostInventory(
            instances=[InventoryEntry(instance=n, running=True, image_sha256=image) for n in names]
        )

    return {f"kvm-{h}": host(h) for h in range(hosts)}


def plan_for(hosts: int, each: int, **limits: Any) -> FleetPlan:
    plan = FleetPlan(limits=FleetLimits(**limits))
    inventory = listing(hosts, each)
    plan.select(Selection(hosts=list(inventory), name_pattern="*"), inventory)
    plan.begin_batch()
    return plan


@dataclass
class Trace:
    """What happened, in order: ("start" | "end", instance), the most that ran at once, the runs."""

    plan: FleetPlan
    events: list[tuple[str, str]] = field(default_factory=list)
    max_running: int = 0
    max_per_host: Counter[str] = field(default_factory=Counter)
    batch_ends: list[int] = field(default_factory=list)
    runs: int = 1
    started_this_run: int = 0

    def started(self) -> list[str]:
        return [name for kind, name in self.events if kind == "start"]


def drive(
    plan: FleetPlan,
    failing: frozenset[str] = frozenset(),
    history_full: Callable[[Trace], bool] = lambda trace: False,
    checks: Callable[[FleetPlan, Step], None] = lambda plan, step: None,
) -> Trace:
    trace = Trace(plan)
    for _ in range(10_000):
        step = trace.plan.advance(history_full(trace))
        checks(trace.plan, step)
        plan = trace.plan
        trace.events += [("start", plan.targets[i].instance) for i in step.start]
        trace.started_this_run += len(step.start)
        trace.max_running = max(trace.max_running, len(plan.running))
        for host, count in Counter(plan.running.values()).items():
            trace.max_per_host[host] = max(trace.max_per_host[host], count)
        if step.then == Then.DONE:
            return trace
        if step.then == Then.NEXT_BATCH:
            trace.batch_ends.append(len(trace.events))
            plan.begin_batch()
        elif step.then == Then.CONTINUE_AS_NEW:
            assert not plan.running, "a run may only end when nothing runs"
            trace.plan = FleetPlan.resume(plan.progress())
            trace.runs += 1
            trace.started_this_run = 0
        elif not plan.running:
            return trace  # paused, with nothing left running: the workflow would wait for resume
        else:
            index = next(iter(plan.running))
            name = plan.targets[index].instance
            if name in failing:
                plan.finish(index, InstanceState.ROLLED_BACK, "boot")
            else:
                plan.finish(index, InstanceState.REBUILT, None)
            trace.events.append(("end", name))
    raise AssertionError("the plan never said it was done")


def test_rolls_in_batches_within_the_unavailability_and_per_host_limits() -> None:
    trace = drive(plan_for(3, 6, batch_size=6, max_unavailable=4, per_host=2, max_failures=5))
    report = trace.plan.report("limits")
    assert report.counts.rebuilt == 18 and report.stop_reason is None
    assert trace.max_running == 4, "the fleet did not use its unavailability allowance"
    assert max(trace.max_per_host.values()) == 2
    # Hosts are interleaved, so each batch of 6 holds two instances of each of the 3 hosts.
    assert [name.split("-")[1] for name in trace.started()[:6]] == ["0", "1", "2", "0", "1", "2"]
    # A batch begins only when the one before has finished: its last end comes before the next start.
    assert len(trace.batch_ends) == 2
    for end in trace.batch_ends:
        assert trace.events[end - 1][0] == "end" and trace.events[end][0] == "start"
        assert sum(1 for kind, _ in trace.events[:end] if kind == "start") % 6 == 0


def test_the_exact_budget_stops_at_exactly_max_failures_and_never_runs_more_than_it_can_absorb() -> None:
    failing = frozenset(f"vm-{h}-{i}" for h in range(2) for i in (1, 3, 4, 6))

    def within_budget(plan: FleetPlan, step: Step) -> None:
        assert len(plan.running) <= plan.limits.max_failures - plan.counts().failures

    plan = plan_for(2, 10, batch_size=20, max_unavailable=4, max_failures=3)
    trace = drive(plan, failing, checks=within_budget)
    report = trace.plan.report("budget")
    assert report.counts.rolled_back == 3 and report.counts.failed == 0
    assert report.stop_reason == "failure budget spent: 3 of 3 failed"
    assert report.counts.running == 0 and report.counts.waiting > 0, "the fleet went on past its budget"
    assert {p.instance for p in report.problems} <= failing and len(report.problems) == 3
    assert all(p.note == "boot" for p in report.problems)
    # The window narrows near the budget: with 3 failures allowed, never more than 3 ran at once.
    assert trace.max_running == 3


def test_allowing_overshoot_keeps_the_full_window_and_still_stops_starting() -> None:
    plan = plan_for(2, 6, batch_size=12, max_unavailable=4, max_failures=1, exact_budget=False)
    trace = drive(plan, failing=frozenset(f"vm-{h}-{i}" for h in range(2) for i in range(6)))
    counts = trace.plan.counts()
    # The first 4 start together; when the first fails the others are in flight and fail too (an exact
    # budget would have run one at a time and stopped at 1); none starts after the budget is spent.
    assert trace.max_running == 4 and len(trace.started()) == 4
    assert counts.rolled_back == 4 and counts.running == 0 and counts.waiting == 8


def test_pause_starts_nothing_new_until_resume() -> None:
    plan = plan_for(2, 5, batch_size=10, max_unavailable=1)
    assert plan.advance(False).start  # one rebuild runs
    assert plan.set_paused(True) and not plan.set_paused(True)
    assert plan.advance(False) == Step([], Then.WAIT)
    (index,) = plan.running
    plan.finish(index, InstanceState.REBUILT, None)
    # Paused with nothing running: the workflow waits for a control, nothing starts.
    assert plan.advance(False) == Step([], Then.WAIT)
    assert plan.counts().rebuilt == 1 and plan.counts().waiting == 9
    assert plan.set_paused(False) and not plan.set_paused(False)
    assert drive(plan).plan.counts().rebuilt == 10


def test_abort_starts_nothing_more_and_ends_when_the_running_rebuilds_have() -> None:
    plan = plan_for(1, 6, batch_size=6, max_unavailable=2, max_failures=5)
    running = plan.advance(False).start
    assert len(running) == 2
    plan.abort_reason = "wrong image (by test)"
    assert plan.advance(False) == Step([], Then.WAIT)
    for index in running:
        plan.finish(index, InstanceState.ABORTED, "aborted")
    assert plan.advance(False) == Step([], Then.DONE)
    report = plan.report("abort")
    assert report.stop_reason == "aborted: wrong image (by test)"
    assert report.counts.aborted == 2 and report.counts.waiting == 4 and report.counts.rebuilt == 0


def test_continues_as_new_only_when_nothing_runs_and_loses_nothing() -> None:
    def after_three_starts(trace: Trace) -> bool:
        # A run's history fills up once it has started three rebuilds.
        return trace.started_this_run >= 3

    plan = plan_for(2, 8, batch_size=5, max_unavailable=3, max_failures=5)
    trace = drive(plan, history_full=after_three_starts)
    report = trace.plan.report("can")
    assert trace.runs >= 3 and report.runs == trace.runs
    assert report.counts.rebuilt == 16
    # Each instance was started once: no run started what its predecessor had already finished.
    assert sorted(trace.started()) == sorted(f"vm-{h}-{i}" for h in range(2) for i in range(8))


def test_a_full_history_starts_nothing_and_waits_for_the_running_to_end() -> None:
    plan = plan_for(1, 4, batch_size=4, max_unavailable=2, max_failures=2)
    first = plan.advance(False).start
    assert plan.advance(True) == Step([], Then.WAIT)
    plan.finish(first[0], InstanceState.REBUILT, None)
    assert plan.advance(True) == Step([], Then.WAIT)
    plan.finish(first[1], InstanceState.REBUILT, None)
    assert plan.advance(True) == Step([], Then.CONTINUE_AS_NEW)
    carried = plan.progress()
    assert carried.runs == 2 and carried.states.count(InstanceState.REBUILT) == 2
    resumed = FleetPlan.resume(carried)
    assert len(resumed.advance(False).start) == 2


def test_the_batch_size_changes_from_the_next_batch() -> None:
    plan = plan_for(1, 6, batch_size=1, max_unavailable=1)
    assert len(plan.advance(False).start) == 1
    plan.set_batch_size(5)
    trace = drive(plan)
    assert trace.plan.counts().rebuilt == 6
    assert len(trace.batch_ends) == 1  # the batch of 1, then one of 5
    status = trace.plan.status("batch", "http://images/x", 0)
    assert status.limits.batch_size == 5 and status.batches == 2


def test_the_selection_comes_from_the_listings_and_a_rerun_skips_what_runs_the_image() -> None:
    inventory = listing(2, 4, image="old")
    plan = FleetPlan(limits=FleetLimits(), image_sha256="new")
    plan.select(Selection(hosts=list(inventory), name_pattern="vm-*-000[01]"), {})  # nothing listed
    assert plan.targets == []
    plan.select(Selection(hosts=list(inventory), name_pattern="vm-*-[01]"), inventory)
    assert [t.instance for t in plan.targets] == ["vm-0-0", "vm-1-0", "vm-0-1", "vm-1-1"]

    listed = Selection(
        instances=[
            FleetTarget(host="kvm-0", instance="vm-0-0"),
            FleetTarget(host="kvm-0", instance="vm-0-2"),
            FleetTarget(host="kvm-1", instance="no-such-vm"),
        ]
    )
    inventory["kvm-0"] = HostInventory(
        instances=[
            InventoryEntry(instance="vm-0-0", running=True, image_sha256="new"),
            *inventory["kvm-0"].instances[1:],
        ]
    )
    rerun = FleetPlan(limits=FleetLimits(), image_sha256="new")
    rerun.select(listed, inventory)
    rerun.skip_current()
    states = {t.instance: s for t, s in zip(rerun.targets, rerun.states, strict=True)}
    assert states == {
        "vm-0-0": InstanceState.SKIPPED,
        "vm-0-2": InstanceState.WAITING,
        "no-such-vm": InstanceState.SKIPPED,
    }
    assert rerun.entries(InstanceState.SKIPPED, 0, 10)[1][1].note == "not defined on kvm-1"
    assert rerun.hosts_with_work() == ["kvm-0"]


def test_instances_are_paged_and_the_status_counts_the_batches() -> None:
    plan = plan_for(2, 5, batch_size=4)
    total, page = plan.entries(None, 8, 5)
    assert total == 10 and [e.instance for e in page] == ["vm-0-4", "vm-1-4"]
    assert plan.entries(InstanceState.REBUILT, 0, 10) == (0, [])
    # A page asked for with a negative offset or no limit still answers (the edge checks those).
    assert len(plan.entries(None, -5, 0)[1]) == 1
    assert plan.status("pages", "img", 7).batches == 3
    assert plan.entry(0).workflow_id == "rebuild:kvm-0:vm-0-0"
