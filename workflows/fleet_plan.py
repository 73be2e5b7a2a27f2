"""The fleet's schedule as a pure plan: which rebuild starts next, when a batch ends, when the fleet stops.

No Temporal in here. The ``FleetRebuild`` workflow drives the plan: it starts the rebuilds the plan picks,
tells it how each one ended and asks what to do next; tests drive it the same way, in milliseconds,
without a server. The instances are taken in batches; inside a batch a rebuild starts whenever a slot
frees up, and three limits hold at every instant:

- at most ``max_unavailable`` rebuilds run at once (only a running rebuild can have its instance down);
- at most ``per_host`` of them on one host (the batch's hosts are taken round-robin);
- never more rebuilds run than failures the budget can still absorb (``exact_budget``, the default),
  so the fleet stops at exactly ``max_failures`` failures instead of overshooting by whatever was in
  flight. The price: the window is min(max_unavailable, failures left), so it narrows near the budget.

Everything a run hands to the run it continues as is one structure, ``FleetProgress``: ``progress()``
writes it and ``resume()`` reads it back, so continue-as-new loses nothing.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from workflows.activity_models import HostInventory
from workflows.fleet_models import (
    FAILURES,
    MAX_NOTE,
    FleetCounts,
    FleetInstance,
    FleetLimits,
    FleetPhase,
    FleetProgress,
    FleetReport,
    FleetStatus,
    FleetTarget,
    InstanceState,
    Selection,
)
from workflows.names import rebuild_workflow_id

MAX_PROBLEMS_SHOWN = 100
MAX_PROBLEMS_REPORTED = 1000


class Then(StrEnum):
    """What the workflow does once it has started the rebuilds the plan picked."""

    WAIT = "wait"  # for a rebuild to end, or for a control (resume, abort)
    NEXT_BATCH = "next-batch"  # the batch is over: pause between batches, then begin_batch()
    CONTINUE_AS_NEW = "continue-as-new"  # the history is full and nothing runs: carry progress()
    DONE = "done"  # every batch is over, or the fleet must stop and nothing runs any more


@dataclass(frozen=True)
class Step:
    start: list[int]  # the rebuilds to start now, in this order (indices into the targets)
    then: Then


@dataclass
class FleetPlan:
    """The fleet's schedule and everything it knows about its instances; see the module's docstring."""

    limits: FleetLimits
    targets: list[FleetTarget] = field(default_factory=list)
    states: list[InstanceState] = field(default_factory=list)
    # Why an instance was skipped or failed, by index (only those with something to say).
    notes: dict[int, str] = field(default_factory=dict)
    batch_start: int = 0
    batch_end: int = 0
    batch_number: int = 0
    paused: bool = False
    abort_reason: str | None = None
    image_sha256: str | None = None
    runs: int = 1
    started_at: datetime | None = None
    phase: FleetPhase = FleetPhase.DISCOVER
    stop_reason: str | None = None
    # The rebuilds started and not ended yet, in the order they started, with their hosts.
    running: dict[int, str] = field(default_factory=dict)
    # The image each instance ran when the fleet began (from the hosts' listings).
    current_images: dict[int, str | None] = field(default_factory=dict)
    # Derived from the above, and rebuilt by every run (a continued run starts with nothing running).
    _counts: Counter[InstanceState] = field(default_factory=Counter, init=False)
    _problems: list[int] = field(default_factory=list, init=False)
    _per_host: Counter[str] = field(default_factory=Counter, init=False)
    _waiting_by_host: dict[str, deque[int]] = field(default_factory=dict, init=False)
    _round_robin: int = field(default=0, init=False)

    @classmethod
    def resume(cls, carried: FleetProgress) -> FleetPlan:
        """The plan of a run that continues another: its successor's state, the batch queued again."""
        plan = cls(
            limits=carried.limits,
            targets=list(carried.targets),
            states=list(carried.states),
            notes=dict(carried.notes),
            batch_start=carried.batch_start,
            batch_end=carried.batch_end,
            batch_number=carried.batch_number,
            paused=carried.paused,
            abort_reason=carried.abort_reason,
            image_sha256=carried.image_sha256,
            runs=carried.runs,
            started_at=carried.started_at,
            phase=FleetPhase.ROLLING,
        )
        plan._counts = Counter(plan.states)
        plan._problems = [i for i, s in enumerate(plan.states) if s in FAILURES]
        plan._queue_batch()
        return plan

    def progress(self) -> FleetProgress:
        """What the next run needs; only taken when nothing runs."""
        return FleetProgress(
            targets=self.targets,
            states=self.states,
            notes=self.notes,
            batch_start=self.batch_start,
            batch_end=self.batch_end,
            batch_number=self.batch_number,
            limits=self.limits,
            paused=self.paused,
            abort_reason=self.abort_reason,
            image_sha256=self.image_sha256,
            runs=self.runs + 1,
            started_at=self.started_at,
        )

    # ---- before the first rebuild --------------------------------------------------------------

    def select(self, selection: Selection, inventory: dict[str, HostInventory]) -> None:
        """The targets, from the selection and what each host's worker listed; the missing are skipped."""
        hosts = list(inventory)
        listed = {host: {e.instance: e for e in listing.instances} for host, listing in inventory.items()}
        if selection.instances:
            targets = list(selection.instances)
        else:
            # Interleave the hosts, so each batch spreads over them and per-host limits bite less.
            by_host = [sorted(name for name in listed[h] if selection.matches(name)) for h in hosts]
            targets = [
                FleetTarget(host=host, instance=names[i])
                for i in range(max((len(n) for n in by_host), default=0))
                for host, names in zip(hosts, by_host, strict=True)
                if i < len(names)
            ]
        self.targets = targets
        self.states = [InstanceState.WAITING] * len(targets)
        for index, target in enumerate(targets):
            entry = listed[target.host].get(target.instance)
            if entry is None:
                self.states[index] = InstanceState.SKIPPED
                self.notes[index] = f"not defined on {target.host}"
            else:
                self.current_images[index] = entry.image_sha256
        self._counts = Counter(self.states)

    def hosts_with_work(self) -> list[str]:
        return list(
            dict.fromkeys(
                t.host for t, s in zip(self.targets, self.states, strict=True) if s == InstanceState.WAITING
            )
        )

    def skip_current(self) -> None:
        """Re-running a fleet leaves alone what already runs the image."""
        if self.image_sha256 is None:
            return
        for index, current in self.current_images.items():
            if current == self.image_sha256 and self.states[index] == InstanceState.WAITING:
                self._set_state(index, InstanceState.SKIPPED)

    # ---- the roll ------------------------------------------------------------------------------

    def advance(self, history_full: bool) -> Step:
        """Start what fits now, and say what comes next. ``history_full``: start nothing more this run."""
        start = self._start_what_fits(history_full)
        if self._must_stop():
            self.phase = FleetPhase.STOPPING
        if self.running:
            return Step(start, Then.WAIT)
        if self._must_stop():
            return Step(start, Then.DONE)
        if not self._waiting_by_host:
            return Step(start, Then.DONE if self.batch_end >= len(self.targets) else Then.NEXT_BATCH)
        # Nothing runs, yet some wait: they wait for the next run, or (paused) for resume.
        return Step(start, Then.CONTINUE_AS_NEW if history_full else Then.WAIT)

    def begin_batch(self) -> None:
        if self.batch_end > 0:
            self.batch_number += 1
        self.batch_start = self.batch_end
        self.batch_end = min(self.batch_start + self.limits.batch_size, len(self.targets))
        self._queue_batch()

    def finish(self, index: int, state: InstanceState, note: str | None) -> None:
        """A rebuild ended (or never started): its state, and why, where there is something to say."""
        self.running.pop(index, None)
        self._per_host[self.targets[index].host] -= 1
        self._set_state(index, state)
        if note:
            self.notes[index] = note[:MAX_NOTE]
        if state in FAILURES:
            self._problems.append(index)

    # ---- controls ------------------------------------------------------------------------------

    def set_paused(self, paused: bool) -> bool:
        """Pause or resume starting rebuilds; False if it already was so."""
        changed, self.paused = self.paused != paused, paused
        return changed

    def set_batch_size(self, batch_size: int) -> None:
        """Takes effect with the next batch."""
        self.limits = self.limits.model_copy(update={"batch_size": batch_size})

    # ---- what it says --------------------------------------------------------------------------

    def counts(self) -> FleetCounts:
        c = self._counts
        return FleetCounts(
            total=len(self.states),
            waiting=c[InstanceState.WAITING],
            running=c[InstanceState.RUNNING],
            rebuilt=c[InstanceState.REBUILT],
            rolled_back=c[InstanceState.ROLLED_BACK],
            failed=c[InstanceState.FAILED],
            skipped=c[InstanceState.SKIPPED],
            aborted=c[InstanceState.ABORTED],
        )

    def entry(self, index: int) -> FleetInstance:
        target = self.targets[index]
        return FleetInstance(
            host=target.host,
            instance=target.instance,
            state=self.states[index],
            note=self.notes.get(index),
            workflow_id=rebuild_workflow_id(target.host, target.instance),
        )

    def entries(
        self, state: InstanceState | None, offset: int, limit: int
    ) -> tuple[int, list[FleetInstance]]:
        """A page of the instances (of one state, or all) and how many there are in all."""
        chosen = [i for i, s in enumerate(self.states) if state is None or s == state]
        window = chosen[max(offset, 0) : max(offset, 0) + min(max(limit, 1), 5000)]
        return len(chosen), [self.entry(i) for i in window]

    def status(self, name: str, image: str, history_length: int) -> FleetStatus:
        remaining = max(len(self.targets) - self.batch_end, 0)
        return FleetStatus(
            name=name,
            phase=self.phase,
            paused=self.paused,
            image=image,
            image_sha256=self.image_sha256,
            limits=self.limits,
            counts=self.counts(),
            batch_number=self.batch_number,
            batches=self.batch_number + 1 + -(-remaining // self.limits.batch_size),
            running=[self.entry(i) for i in self.running],
            problems=[self.entry(i) for i in self._problems[-MAX_PROBLEMS_SHOWN:]],
            abort_reason=self.abort_reason,
            stop_reason=self.stop_reason,
            runs=self.runs,
            history_length=history_length,
            started_at=self.started_at,
        )

    def report(self, name: str) -> FleetReport:
        return FleetReport(
            name=name,
            counts=self.counts(),
            stop_reason=self.stop_reason,
            problems=[self.entry(i) for i in self._problems[-MAX_PROBLEMS_REPORTED:]],
            runs=self.runs,
        )

    def details(self, name: str) -> str:
        """The Web UI's current details: counts, progress, what holds the fleet back."""
        c, limits = self.counts(), self.limits
        lines = [
            f"**fleet {name}**: {self.phase.value}"
            + (" (paused)" if self.paused else "")
            + f", batch {self.batch_number + 1}",
            f"{c.finished} of {c.total} done: {c.rebuilt} rebuilt, {c.rolled_back} rolled back, "
            f"{c.failed} failed, {c.skipped} skipped, {c.aborted} aborted; {c.running} running",
            f"limits: {limits.max_unavailable} at once, {limits.per_host or '-'} per host, "
            f"{limits.max_failures} failures allowed",
        ]
        if self.stop_reason:
            lines.append(f"stopped: {self.stop_reason}")
        return "\n\n".join(lines)

    # ---- inside ----------------------------------------------------------------------------------

    def _start_what_fits(self, history_full: bool) -> list[int]:
        if self.paused or self._must_stop() or history_full:
            return []
        started: list[int] = []
        limits = self.limits
        while len(self.running) < limits.max_unavailable and (
            not limits.exact_budget or len(self.running) < limits.max_failures - self.counts().failures
        ):
            index = self._next_waiting()
            if index is None:
                break
            host = self.targets[index].host
            self.running[index] = host
            self._per_host[host] += 1
            self._set_state(index, InstanceState.RUNNING)
            started.append(index)
        return started

    def _next_waiting(self) -> int | None:
        """Round-robin over the batch's hosts, skipping hosts at their limit."""
        hosts = list(self._waiting_by_host)
        for _ in hosts:
            host = hosts[self._round_robin % len(hosts)]
            self._round_robin += 1
            if self.limits.per_host is not None and self._per_host[host] >= self.limits.per_host:
                continue
            queue = self._waiting_by_host[host]
            index = queue.popleft()
            if not queue:
                del self._waiting_by_host[host]
            return index
        return None

    def _must_stop(self) -> bool:
        if self.abort_reason is not None:
            self.stop_reason = f"aborted: {self.abort_reason}"
            return True
        failures = self.counts().failures
        if failures >= self.limits.max_failures:
            self.stop_reason = f"failure budget spent: {failures} of {self.limits.max_failures} failed"
            return True
        return False

    def _queue_batch(self) -> None:
        self._waiting_by_host = {}
        for index in range(self.batch_start, self.batch_end):
            if self.states[index] == InstanceState.WAITING:
                self._waiting_by_host.setdefault(self.targets[index].host, deque()).append(index)

    def _set_state(self, index: int, state: InstanceState) -> None:
        self._counts[self.states[index]] -= 1
        self.states[index] = state
        self._counts[state] += 1
