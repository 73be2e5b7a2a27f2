"""A running domain's point-in-time disk copy: libvirt's backup API (push mode) and the agent's freeze.

``virDomainBackupBegin`` fixes the point in time when it returns and QEMU copies on in the background,
the guest running on; the copy is finished when the domain's job ends as completed. A guest's file
systems are frozen through its agent only around the begin, each agent call under its own timeout
(libvirt's ``fsFreeze`` waits as long as the agent does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt

from activities import domain_xml as dx
from activities.libvirt_domain import Domain, call_agent

_NO_BACKUP = {libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID}


@dataclass(frozen=True)
class BackupProgress:
    running: bool
    processed: int
    total: int


class DomainBackup:
    """The backup calls on one domain; every call blocks (run it in a thread)."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    def _call(self, action: Any) -> Any:
        return self.domain.libvirt.with_domain(self.domain.name, action)

    # -- the guest's file systems --

    def freeze(self, timeout_seconds: int) -> bool:
        """Freeze the guest's file systems; False where its agent does not answer or cannot."""

        def freeze(domain: Any) -> bool:
            try:
                call_agent(domain, "guest-fsfreeze-freeze", timeout_seconds)
            except libvirt.libvirtError:
                return False
            return True

        return bool(self._call(freeze))

    def thaw(self, timeout_seconds: int) -> bool:
        """Thaw them. True: thawed now, or never frozen; False: the agent did not answer."""

        def thaw(domain: Any) -> bool:
            try:
                call_agent(domain, "guest-fsfreeze-thaw", timeout_seconds)
            except libvirt.libvirtError:
                try:
                    return bool(call_agent(domain, "guest-fsfreeze-status", timeout_seconds) == "thawed")
                except libvirt.libvirtError:
                    return False
            return True

        return bool(self._call(thaw))

    def freeze_status(self, timeout_seconds: int) -> str | None:
        """ "frozen" or "thawed" as the agent says; None where it does not answer."""

        def status(domain: Any) -> str | None:
            try:
                return str(call_agent(domain, "guest-fsfreeze-status", timeout_seconds))
            except libvirt.libvirtError:
                return None

        result: str | None = self._call(status)
        return result

    # -- the copy --

    def begin(self, target: str, disk_format: str, xml_root: str, every_disk: list[str]) -> None:
        """Begin a push backup of the disk ``xml_root`` into ``target``; the other disks are left out."""
        definition = dx.backup_definition(xml_root, target, disk_format, every_disk)
        self._call(lambda d: d.backupBegin(definition, None, 0))

    def running_target(self) -> str | None:
        """The file the domain's running backup job writes, if one runs."""

        def read(domain: Any) -> str | None:
            try:
                return dx.backup_target(domain.backupGetXMLDesc(0))
            except libvirt.libvirtError as err:
                if err.get_error_code() in _NO_BACKUP:
                    return None
                raise

        result: str | None = self._call(read)
        return result

    def progress(self) -> BackupProgress:
        stats: dict[str, Any] = self._call(lambda d: d.jobStats(0))
        running = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
        processed = int(stats.get("disk_processed", stats.get("data_processed", 0)))
        total = int(stats.get("disk_total", stats.get("data_total", 0)))
        return BackupProgress(running, processed, total)

    def completed(self) -> str | None:
        """How the domain's last job ended: None where it completed, else why it did not."""
        stats: dict[str, Any] = self._call(lambda d: d.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        if stats.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED:
            return None
        return str(stats.get("errmsg") or f"the backup job ended as {stats.get('type')!r}")

    def abort(self) -> None:
        def abort(domain: Any) -> None:
            try:
                domain.abortJob()
            except libvirt.libvirtError as err:
                if err.get_error_code() not in _NO_BACKUP:
                    raise

        self._call(abort)
