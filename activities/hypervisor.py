"""Activities that talk to the hypervisor: inspect, stop, start and verify an instance.

Every blocking libvirt call runs in a thread; waits heartbeat so a dead worker is noticed in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import rebuildable
from activities.boot_check import BootCheck, console_size
from activities.checkpoints import Checkpoints
from activities.errors import BootCheckFailed, InvalidRequest
from activities.heartbeat import keep_alive
from activities.root_disks import RootDiskAt
from activities.state import StateDir, write_atomically
from workflows.models import (
    DISK_TARGET,
    InspectInstanceInput,
    InstanceInfo,
    RecordImageInput,
    StartInstanceInput,
    StartResult,
    StopInstanceInput,
    StopMethod,
    StopResult,
    VerifyInstanceInput,
    VerifyResult,
)

POLL_SECONDS = 0.1
# The ACPI button gets this share of the stop timeout (at most AGENT_AFTER_SECONDS) before the guest
# agent is asked too: a guest whose ACPI handling is broken or slow still stops without force.
AGENT_SHARE = 1 / 3
AGENT_AFTER_SECONDS = 10.0
# Inspect asks libvirt whether it would accept the new disk's definition before the image is known:
# any cached image's path stands for it (the path is never opened).
PLANNED_BASE = "/var/lib/durable-rebuild/images/" + "0" * 64
# Start records outlive every rebuild (the longest approval plus confirm window is 37 days).
START_RECORD_DAYS = 40


class HypervisorActivities:
    def __init__(
        self,
        libvirt_conn: ld.Libvirt,
        checkpoints: Checkpoints | None = None,
        preflight_by_default: bool = False,
        boot_check: BootCheck | None = None,
        state: StateDir | None = None,
        swaps_in_one_step: bool = False,
        cleans_up_in_one_step: bool = False,
    ) -> None:
        self.libvirt = libvirt_conn
        # The worker registers swap_root_disk (activities/swap.py) and clean_up_rebuild
        # (activities/cleanup.py): inspect says so to the workflow.
        self.swaps_in_one_step = swaps_in_one_step
        self.cleans_up_in_one_step = cleans_up_in_one_step
        self.checkpoints = checkpoints or Checkpoints()
        self.preflight_by_default = preflight_by_default
        self.boot_check = boot_check or BootCheck(libvirt_conn)
        # Where start records are kept; without it, start records nothing and verify refuses all.
        self.state = state

    @activity.defn
    async def inspect_instance(self, request: InspectInstanceInput) -> InstanceInfo:
        """What the rebuild needs to know, and every refusal that can be made while the instance runs."""
        if request.root_disk is not None and not DISK_TARGET.fullmatch(request.root_disk):
            raise InvalidRequest(f"not a disk target device: {request.root_disk[:40]!r}")
        domain = self.libvirt.domain(request.instance)

        def read() -> InstanceInfo:
            xml = domain.definition()
            disk = dx.root_disk(xml, request.instance, request.root_disk)
            root = RootDiskAt(domain, xml, disk)
            rebuildable.refuse_unrebuildable(root, request.discard_snapshots)
            planned = dx.rebuilt_disk(dx.disk_element(xml, disk.target), PLANNED_BASE, "qcow2")
            self.libvirt.refuse_invalid_disk(request.instance, xml, planned)
            record = domain.image_record()
            return InstanceInfo(
                name=domain.name,
                uuid=domain.uuid(),
                was_running=domain.is_active(),
                root_disk_path=disk.path,
                root_disk_format=disk.format,
                root_disk_target=disk.target,
                current_image_sha256=record.get("sha256") if record is not None else None,
                current_image_url=record.get("url") if record is not None else None,
                has_identity=dx.current_identity(xml) is not None,
                preflight_by_default=self.preflight_by_default,
                swaps_in_one_step=self.swaps_in_one_step,
                cleans_up_in_one_step=self.cleans_up_in_one_step,
            )

        return await asyncio.to_thread(read)

    @activity.defn
    async def stop_instance(self, request: StopInstanceInput) -> StopResult:
        """ACPI first, then the guest agent's shutdown too, then forced off after the timeout.

        An instance already off is a success. A paused or suspended one, or a transient domain, is
        refused before anything (a paused guest ignores ACPI, a transient domain vanishes at the stop).
        """
        return await self.stop(request)

    async def stop(self, request: StopInstanceInput, console: bool = True) -> StopResult:
        """``stop_instance``'s work; without ``console``, the console's offset is not read (0): a
        rebuild's start record keeps the offset its verify reads."""
        domain = self.libvirt.domain(request.instance)
        await asyncio.to_thread(rebuildable.refuse_domain_state, domain)
        state = await asyncio.to_thread(domain.power_state)
        was_running = state != "off"
        stopped_by: StopMethod | None = None
        if was_running:
            # A crashed guest (on_crash='preserve') answers nothing: it is forced off at once.
            timeout = 0 if state == "crashed" else request.timeout_seconds
            stopped_by = await self._shut_down(domain, timeout)
        await self.checkpoints.reach("stop.after-off")
        offset = 0
        if console:
            offset = console_size(dx.serial_log(await asyncio.to_thread(domain.definition)))
        return StopResult(
            was_running=was_running,
            forced=stopped_by == "forced",
            stopped_at=datetime.now(UTC),
            console_offset=offset,
            stopped_by=stopped_by,
        )

    async def _shut_down(self, domain: ld.Domain, timeout_seconds: float) -> StopMethod:
        began = time.monotonic()
        deadline = began + timeout_seconds
        if timeout_seconds <= 0:
            await asyncio.to_thread(domain.force_off)
            return "forced"
        await asyncio.to_thread(domain.press_power_button)
        asked: StopMethod = "acpi"
        agent_at = began + min(timeout_seconds * AGENT_SHARE, AGENT_AFTER_SECONDS)
        while await asyncio.to_thread(domain.is_active):
            activity.heartbeat(f"waiting for guest shutdown ({asked})")
            now = time.monotonic()
            if now >= deadline:
                await asyncio.to_thread(domain.force_off)
                return "forced"
            if asked == "acpi" and now >= agent_at:
                asked = "agent"
                if not await asyncio.to_thread(domain.ask_agent_to_shut_down):
                    # No agent to ask: what stops the guest now is still its ACPI handling.
                    asked = "acpi"
                    agent_at = deadline
            await asyncio.sleep(POLL_SECONDS)
        return asked

    @activity.defn
    async def start_instance(self, request: StartInstanceInput) -> StartResult:
        """An instance already running is a success: a retry after a crash must not fail.

        With a rebuild ID, the start is recorded (which domain, which boot, where its console stood
        before it): verify checks that boot only. An instance that was running already gets no
        record, unless this rebuild's earlier attempt started it.
        """
        async with keep_alive():
            return await self.start(request)

    async def start(
        self,
        request: StartInstanceInput,
        stopped: StopResult | None = None,
        definition: ET.Element | None = None,
    ) -> StartResult:
        """``start_instance``'s work; ``stopped`` (how the stop went) is kept in the start record, for
        a retry of ``swap_root_disk`` that finds the instance started already. ``definition``, read
        before the stop, names the serial log without a read of it inside the downtime."""
        record = None if request.rebuild_id is None else self._start_record_path(request.rebuild_id)
        domain = self.libvirt.domain(request.instance)
        if record is not None:
            await asyncio.to_thread(self._record_before_start, record, domain, stopped, definition)
        await self.checkpoints.reach("start.before-create")
        already_running = await asyncio.to_thread(domain.start)
        started_at = datetime.now(UTC)
        if record is not None:
            await asyncio.to_thread(self._record_after_start, record, domain)
        await self.checkpoints.reach("start.after-create")
        return StartResult(started_at=started_at, already_running=already_running)

    def _start_record_path(self, rebuild_id: str) -> Path:
        if self.state is None:
            raise InvalidRequest("this worker has no state directory to record starts in")
        return self.state.start_record(rebuild_id)

    def _record_before_start(
        self,
        path: Path,
        domain: ld.Domain,
        stopped: StopResult | None = None,
        definition: ET.Element | None = None,
    ) -> None:
        """Before a start: this rebuild is about to boot this domain, its console now ends here."""
        if domain.is_active():
            return  # not started by this call: recorded (or not) by the attempt that started it
        if stopped is None:  # swap_root_disk made the directory and pruned it before the stop
            self.prepare_start_records(path)
        # The serial console is not among what prepare's define changes: a definition from before
        # the stop names the same log.
        log = dx.serial_log(definition if definition is not None else domain.definition())
        record: dict[str, object] = {
            "instance": domain.name,
            "uuid": domain.uuid(),
            "console_offset": console_size(log),
            "run_id": None,
        }
        if stopped is not None:
            record["stopped"] = stopped.model_dump(mode="json")
        write_atomically(path, json.dumps(record), mode=0o600)

    def prepare_start_records(self, path: Path) -> None:
        """The start records' directory, made private, with the records older than any rebuild gone."""
        path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path.parent, 0o700)
        self._prune_start_records(path.parent)

    def started_by(self, rebuild_id: str, instance: str) -> StopResult | None:
        """How the stop went, where this rebuild's own start of ``instance`` has happened already (a
        ``swap_root_disk`` that died after its start); None where it has not."""
        record = _read_record(self._start_record_path(rebuild_id))
        domain = self.libvirt.domain(instance)
        if record is None or record.get("instance") != instance or "stopped" not in record:
            return None
        if record.get("uuid") != domain.uuid() or not domain.is_active():
            return None
        run_id = record.get("run_id")
        if run_id is not None and run_id != domain.run_id():
            return None
        return StopResult.model_validate(record["stopped"])

    def _record_after_start(self, path: Path, domain: ld.Domain) -> None:
        """After it: which run of the domain is this rebuild's (libvirt's ID changes at every start)."""
        record = _read_record(path)
        if record is None or record.get("instance") != domain.name or record.get("run_id") is not None:
            return
        if record.get("uuid") != domain.uuid():
            return
        write_atomically(path, json.dumps(record | {"run_id": domain.run_id()}), mode=0o600)

    @staticmethod
    def _prune_start_records(directory: Path) -> None:
        oldest = time.time() - START_RECORD_DAYS * 86400
        for old in directory.glob("*.json"):
            try:
                if old.stat().st_mtime < oldest:
                    old.unlink()
            except FileNotFoundError:
                continue

    @activity.defn
    async def verify_instance(self, request: VerifyInstanceInput) -> VerifyResult | None:
        """The new image booted, as the request's verify mode proves it (see ``BootCheck``).

        Only on the boot this rebuild started (its start record), and only on that boot's console
        output: verify is no oracle over another instance's serial log.
        """
        if request.rebuild_id is None:
            raise InvalidRequest("verify checks only a boot its rebuild started: a rebuild_id is required")
        path = self._start_record_path(request.rebuild_id)
        record = await asyncio.to_thread(_read_record, path)
        if record is None or record.get("instance") != request.instance:
            raise InvalidRequest(
                f"rebuild {request.rebuild_id!r} did not start instance {request.instance!r} on this host: "
                "verify checks only a boot its own rebuild started"
            )
        domain = self.libvirt.domain(request.instance)
        uuid, run_id = await asyncio.to_thread(lambda: (domain.uuid(), domain.run_id()))
        if uuid != record.get("uuid"):
            raise InvalidRequest(
                f"instance {request.instance!r} is another domain than the one rebuild "
                f"{request.rebuild_id!r} started (UUID {uuid}, not {record.get('uuid')})"
            )
        if run_id is None:
            raise BootCheckFailed(f"instance {request.instance!r} is not running after start")
        if run_id != record.get("run_id"):
            raise BootCheckFailed(
                f"instance {request.instance!r} was started again since rebuild {request.rebuild_id!r} "
                "started it: this boot is not the rebuild's to verify"
            )
        offset = record.get("console_offset")
        checked = request.model_copy(update={"console_offset": offset if isinstance(offset, int) else 0})
        return await self.boot_check.verify(checked)

    @activity.defn
    async def record_image(self, request: RecordImageInput) -> None:
        """Write the new image into the domain's metadata, where the next rebuild and operators see it."""
        attributes = {
            "sha256": request.image_sha256,
            "url": request.image_url,
            "rebuilt-at": request.rebuilt_at.isoformat(),
        }
        await asyncio.to_thread(self.libvirt.domain(request.instance).record_image, attributes)


def _read_record(path: Path) -> dict[str, object] | None:
    try:
        found = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return found if isinstance(found, dict) else None
