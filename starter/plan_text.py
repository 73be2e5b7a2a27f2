"""A dry run's plan as ``rebuild start --dry-run`` prints it: what a real run would change, at 80 columns.

Lines are short and labelled, so a person reads it as Terraform's plan, and a script takes ``--json``;
long ones wrap at 80 columns, never inside a path, a URL or a digest.
"""

from __future__ import annotations

import textwrap

from starter.cache_cli import size_text
from starter.cli_context import Cli
from workflows.models import RebuildResult
from workflows.plan_models import RebuildPlan


def print_plan(cli: Cli, result: RebuildResult) -> None:
    """The plan of a dry run that passed every check; nothing on the instance was changed."""
    plan = result.plan
    assert plan is not None
    state = "running" if plan.running else "off"
    cli.say(f"dry run of {plan.instance} on {plan.host}: nothing changed ({state}, as before)")
    cli.say("a rebuild would:")
    for line in plan_lines(plan, "  "):
        cli.say(line)
    timings = ", ".join(f"{step} {seconds:.2f}s" for step, seconds in result.step_seconds.items())
    cli.say(f"  steps: {timings}")


WIDTH = 80


def plan_lines(plan: RebuildPlan, indent: str) -> list[str]:
    """The plan's lines, each after ``indent``, wrapped at ``WIDTH`` columns."""
    lines = []
    for line in _items(plan):
        inner = indent + " " * (len(line) - len(line.lstrip()))
        text = line.lstrip()
        if any(len(word) > WIDTH - len(inner) - 2 for word in text.split()):
            # A path, URL or digest wider than a wrapped line: kept whole, beside its label.
            lines.append(inner + text)
            continue
        lines += textwrap.wrap(
            text,
            WIDTH,
            initial_indent=inner,
            subsequent_indent=inner + "  ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    return lines


def _items(plan: RebuildPlan) -> list[str]:
    disk, image = plan.root_disk, plan.image
    cached = "in the host's cache already" if image.cached_before else "downloaded now, cached for it"
    lines = [
        f"root disk: {disk.target} ({disk.kind}, {disk.format}, {size_text(disk.virtual_size)})",
        f"  at {disk.path}",
        f"new disk: {disk.mode}, {size_text(disk.new_virtual_size)}",
        f"image: {image.label}",
        f"  sha256 {image.sha256}",
        f"  {image.format}, {size_text(image.virtual_size)} virtual, {cached}",
    ]
    if plan.identity_changes:
        lines.append("identity (cloud-init seed):")
        lines += [f"  {change}" for change in plan.identity_changes]
    else:
        lines.append("identity: no seed is written (no identity given or kept)")
    lines.append(f"downtime: {plan.downtime.estimate}")
    if plan.downtime.measured_median_seconds is not None:
        lines.append(
            f"  measured here: off to running in a median {plan.downtime.measured_median_seconds:.2f} s "
            f"over the host's last {plan.downtime.measured_rebuilds} rebuild(s), the stop not counted"
        )
    lines.append("checks passed:")
    lines += [f"  {check}" for check in plan.checks]
    lines += [f"note: {note}" for note in plan.notes]
    return lines
