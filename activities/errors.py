"""The failures a rebuild can meet, named once.

Each is an ``ApplicationError`` whose ``type`` is the class name, so the workflow and the CLI can tell
them apart after they crossed the Temporal boundary. Those no retry can fix are non-retryable.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError


class RebuildError(ApplicationError):
    """Base of every error the project raises on purpose."""

    retryable: bool = True

    def __init__(self, message: str) -> None:
        super().__init__(message, type=type(self).__name__, non_retryable=not self.retryable)


class InstanceNotFound(RebuildError):
    retryable = False


class UnsupportedInstance(RebuildError):
    """The instance's definition is not one we can rebuild (no file-backed root disk, ...)."""

    retryable = False


class InstanceNotStopped(RebuildError):
    """A disk was about to change under a running instance: retried, the stop may still land."""


class HypervisorUnavailable(RebuildError):
    """libvirt could not be reached; the daemon may come back."""


class HypervisorError(RebuildError):
    """libvirt refused an operation in a way a retry may fix."""


class DefinitionRefused(RebuildError):
    """libvirt refused a definition as invalid or unsupported: the same definition is refused again."""

    retryable = False


class InstanceStartFailed(RebuildError):
    retryable = False


class BootCheckFailed(RebuildError):
    retryable = False


class ConsoleBusy(RebuildError):
    """Another client holds the domain's console: the boot check never forces it away."""

    retryable = False


class ImageNotFound(RebuildError):
    retryable = False


class ImageDownloadError(RebuildError):
    """A transfer problem (dropped connection, 5xx, short body): retry resumes it."""


class ChecksumMismatch(RebuildError):
    retryable = False


class UnsafeImage(RebuildError):
    retryable = False


class ImageTooLarge(RebuildError):
    retryable = False


class HostOutOfSpace(RebuildError):
    retryable = False


class CacheQuotaExceeded(RebuildError):
    """The image would take the host's image cache past the worker's quota (``--cache-quota-gib``)."""

    retryable = False


class DiskMissing(RebuildError):
    """Neither the root disk nor its backup exists: nothing we can do safely."""

    retryable = False


class DiskToolFailed(RebuildError):
    """qemu-img failed for a reason a retry may fix (a lock held for a moment, ...)."""


class InvalidRequest(RebuildError):
    retryable = False


class ImageSourceRefused(RebuildError):
    """The image URL (or a redirect) leads somewhere this worker may not connect to."""

    retryable = False


class PreflightFailed(RebuildError):
    """The new image did not boot in its sandbox: the instance was never stopped."""

    retryable = False


class EmptyImage(RebuildError):
    """The image has nothing to boot: no virtual size, or only zeros where a boot sector must be."""

    retryable = False


class SnapshotNotFound(RebuildError):
    """No snapshot with this ID on this host (it may live on another host, or have been deleted)."""

    retryable = False


class QuiesceFailed(RebuildError):
    """A quiesced snapshot was asked for and the guest agent could not freeze the file systems."""

    retryable = False


class SnapshotFailed(RebuildError):
    """The backup job ended without a whole copy (the guest shut down, QEMU failed): a retry starts over."""


NON_RETRYABLE_TYPES: tuple[str, ...] = tuple(
    cls.__name__ for cls in RebuildError.__subclasses__() if not cls.retryable
)
