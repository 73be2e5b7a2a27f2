"""Issue 24, finding 1: a verify pattern cannot freeze a host's worker.

``console:REGEX`` comes from whoever starts a rebuild, or schedules ``verify_instance`` by name. With
Python's backtracking ``re``, ``(a+)+b`` against a console of ``a``s runs for ever holding the GIL: the
worker ignores SIGTERM and every other activity on its host. The check runs in a child process here, so
that before the fix the test fails on its timeout instead of freezing pytest with it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devtools.testbed.libvirt_test_driver import make_instance
from workflows.models import StrictRebuildRequest, VerifySpec

_CHECK = textwrap.dedent(
    """
    import asyncio, sys, time
    from temporalio.testing import ActivityEnvironment
    from activities.errors import BootCheckFailed
    from activities.hypervisor import HypervisorActivities
    from pathlib import Path
    from activities.libvirt_domain import Libvirt
    from activities.state import StateDir
    from workflows.models import StartInstanceInput, VerifyInstanceInput

    async def main() -> None:
        host = Libvirt(sys.argv[1])
        host.domain("vm-1").force_off()
        state = StateDir(Path(sys.argv[3]))
        state.create()
        hypervisor = HypervisorActivities(host, state=state)
        env = ActivityEnvironment()
        await env.run(hypervisor.start_instance, StartInstanceInput(instance="vm-1", rebuild_id="r1"))
        # The console a hostile image's boot prints (the boot this rebuild started).
        console = Path(sys.argv[4])
        if sys.argv[5] == "zero":
            console.symlink_to("/dev/zero")  # a console that never stops printing
        else:
            console.write_bytes(b"a" * (4 << 20))  # 4 MiB of output, more than one read, no b in it
        began = time.monotonic()
        try:
            await env.run(
                hypervisor.verify_instance,
                VerifyInstanceInput(
                    instance="vm-1", verify=sys.argv[2], boot_timeout_seconds=0.3, rebuild_id="r1"
                ),
            )
            print("verified", time.monotonic() - began)
        except BootCheckFailed as err:
            print("refused", time.monotonic() - began, err.message)

    asyncio.run(main())
    """
)


def _verify_in_a_child(tmp_path: Path, verify: str, console: str) -> tuple[str, float]:
    vm = make_instance(tmp_path)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHECK,
                vm.libvirt.uri,
                verify,
                str(tmp_path / "state"),
                str(vm.serial),
                console,
            ],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=Path(__file__).parent.parent,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"verify {verify!r} was still searching the console after 20 s")
    assert done.returncode == 0, done.stderr
    outcome, seconds, *_ = done.stdout.split(" ", 2)
    return outcome, float(seconds)


@pytest.mark.parametrize("pattern", ["(a+)+b", "(.+)+\\x00", "(a|aa)+$x"])
def test_a_catastrophic_pattern_over_a_console_of_as_ends_at_its_timeout(
    tmp_path: Path, pattern: str
) -> None:
    outcome, seconds = _verify_in_a_child(tmp_path, f"console:{pattern}", "as")
    assert outcome == "refused"
    assert seconds < 1.0


def test_a_guest_that_prints_without_end_cannot_keep_the_check_past_its_timeout(tmp_path: Path) -> None:
    outcome, seconds = _verify_in_a_child(tmp_path, "console:login:", "zero")
    assert outcome == "refused"
    assert seconds < 1.0


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("(a)\\1", "invalid escape sequence"),
        ("(?=login)", "invalid perl operator"),
        ("a{1001}", "invalid repetition size"),
    ],
)
def test_what_re2_cannot_compile_is_refused_at_the_edge(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"RE2 accepts .*{why}"):
        VerifySpec.parse(f"console:{pattern}")
    with pytest.raises(ValueError, match=why):
        StrictRebuildRequest(
            instance="vm-1", host="h1", image_url="http://images.example/a.img", verify=f"console:{pattern}"
        )


def test_a_long_pattern_is_refused_where_the_activity_parses_it_too() -> None:
    with pytest.raises(ValueError, match="at most 300 characters"):
        VerifySpec.parse("console:" + "x" * 301)


def test_ordinary_patterns_still_match() -> None:
    regex = VerifySpec.parse("console:(?i)Reached target [a-z-]+\\.target").pattern
    assert regex is not None
