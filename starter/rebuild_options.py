"""The options of a rebuild, defined once: ``rebuild start`` and ``rebuild fleet start`` both take them.

Each is an ``Annotated`` type with its help, its metavar and the panel ``--help`` shows it in (Typer's
``rich_help_panel``), so a command reads at 80 columns and the two commands say the same thing the
same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from workflows.identity import SeedFormat

# The panels of `rebuild start --help` (and of `rebuild fleet start --help`), in the order shown.
IMAGE_PANEL = "Image"
STOP_BOOT_PANEL = "Stop, boot and verify"
DISK_PANEL = "Root disk"
APPROVAL_PANEL = "Approval and confirm window"
IDENTITY_PANEL = "Guest identity (Nova's rebuild options; not given: kept)"

ImageOption = Annotated[
    str | None,
    typer.Option(
        metavar="URL",
        rich_help_panel=IMAGE_PANEL,
        help="The new image: http(s)://, or file:/// inside the worker's image dir.",
    ),
]
Sha256Option = Annotated[
    str | None,
    typer.Option(metavar="HEX", rich_help_panel=IMAGE_PANEL, help="Expected SHA-256 of the image."),
]
Sha512Option = Annotated[
    str | None,
    typer.Option(metavar="HEX", rich_help_panel=IMAGE_PANEL, help="Expected SHA-512 of the image."),
]
ChecksumOption = Annotated[
    str | None,
    typer.Option(
        metavar="ALGO:HEX", rich_help_panel=IMAGE_PANEL, help="Expected digest, ALGO sha256 or sha512."
    ),
]
DiskFormatOption = Annotated[
    str | None,
    typer.Option(
        metavar="FORMAT",
        rich_help_panel=IMAGE_PANEL,
        help="Declared format, raw or qcow2: an image whose header differs is refused.",
    ),
]
GlanceOption = Annotated[
    str | None,
    typer.Option(
        metavar="URL", rich_help_panel=IMAGE_PANEL, help="Glance image service (with --glance-image)."
    ),
]
GlanceImageOption = Annotated[
    str | None,
    typer.Option(metavar="ID", rich_help_panel=IMAGE_PANEL, help="Glance v2 image ID (with --glance)."),
]
StartAfterOption = Annotated[
    bool | None,
    typer.Option(
        "--start/--no-start",
        rich_help_panel=STOP_BOOT_PANEL,
        help="Start the instance afterwards (default: if it was running).",
    ),
]
StopTimeoutOption = Annotated[
    float,
    typer.Option(
        metavar="SECONDS",
        rich_help_panel=STOP_BOOT_PANEL,
        help="Graceful shutdown window (ACPI, then the guest agent) before a forced power-off.",
    ),
]
BootMarkerOption = Annotated[
    str | None,
    typer.Option(
        metavar="TEXT",
        rich_help_panel=STOP_BOOT_PANEL,
        help="Text the new image must print on the serial console, or it is rolled back.",
    ),
]
BootTimeoutOption = Annotated[
    float,
    typer.Option(
        metavar="SECONDS",
        rich_help_panel=STOP_BOOT_PANEL,
        help="Time the new image has to pass --boot-marker or --verify.",
    ),
]
VerifyOption = Annotated[
    str | None,
    typer.Option(
        metavar="MODE",
        rich_help_panel=STOP_BOOT_PANEL,
        help="How the new image proves it booted, or it is rolled back: agent (the guest agent "
        "answers), console:REGEX (the serial console prints a match), running:SECONDS (only that the "
        "domain runs: it cannot tell an empty disk from a booted one). Default: agent where the domain "
        "has a guest agent channel, else running:5. Whatever the mode, the running root disk must be "
        "the new disk this rebuild made.",
    ),
]
PreflightOption = Annotated[
    bool | None,
    typer.Option(
        "--preflight/--no-preflight",
        rich_help_panel=STOP_BOOT_PANEL,
        help="Boot the new image in a throwaway sandbox first; a broken image then fails with the "
        "instance never stopped (default: the host worker's setting).",
    ),
]
DryRunOption = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Inspect, fetch, check (and pre-flight) only, then print what a rebuild would change: "
        "the instance is not touched. Waits for the plan.",
    ),
]
DiskModeOption = Annotated[
    str | None,
    typer.Option(
        metavar="MODE",
        rich_help_panel=DISK_PANEL,
        help="A file root disk's new disk: overlay (a qcow2 overlay on the cached image, constant "
        "time) or copy (a standalone disk in the old disk's format, raw stays raw: a reflink where the "
        "file system has them, else a full copy, made before the stop). Default: the host worker's "
        "--disk-mode.",
    ),
]
RequestedByOption = Annotated[
    str,
    typer.Option(metavar="NAME", help="Who asked, shown in the Web UI (default: $USER).", show_default=False),
]
REQUESTED_BY = os.environ.get("USER", "unknown")

# Only `rebuild start` has these so far.
RootDiskOption = Annotated[
    str | None,
    typer.Option(
        metavar="TARGET",
        rich_help_panel=DISK_PANEL,
        help="The root disk's target device (vda, sdb, ...), where the boot order does not make it "
        "certain. Default: the first disk in the domain's boot order.",
    ),
]
DiscardSnapshotsOption = Annotated[
    bool,
    typer.Option(
        "--discard-snapshots",
        rich_help_panel=DISK_PANEL,
        help="Rebuild although the instance has snapshots: they go with the old disk once the rebuild "
        "is kept (a rollback brings them back).",
    ),
]
RequireApprovalOption = Annotated[
    bool,
    typer.Option(
        "--require-approval",
        rich_help_panel=APPROVAL_PANEL,
        help="Wait for `rebuild approve` before the stop.",
    ),
]
ApprovalTimeoutOption = Annotated[
    float,
    typer.Option(
        metavar="SECONDS",
        rich_help_panel=APPROVAL_PANEL,
        help="Time to wait for approval; then it ends with nothing changed.",
    ),
]
ConfirmWithinOption = Annotated[
    float | None,
    typer.Option(
        metavar="SECONDS",
        rich_help_panel=APPROVAL_PANEL,
        help="Keep the old disk this long for `rebuild confirm` or `rebuild revert`.",
    ),
]
RevertByDefaultOption = Annotated[
    bool,
    typer.Option(
        "--revert-by-default",
        rich_help_panel=APPROVAL_PANEL,
        help="At the confirm window's end, revert (not confirm).",
    ),
]
SshKeyOption = Annotated[
    list[Path] | None,
    typer.Option(
        metavar="FILE",
        rich_help_panel=IDENTITY_PANEL,
        help="Public key file for the guest (repeatable); replaces the keys.",
    ),
]
NoSshKeysOption = Annotated[
    bool, typer.Option("--no-ssh-keys", rich_help_panel=IDENTITY_PANEL, help="Remove the guest's keys.")
]
UserDataOption = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        rich_help_panel=IDENTITY_PANEL,
        help="cloud-config or script for cloud-init, ≤ 64 KiB.",
    ),
]
NoUserDataOption = Annotated[
    bool, typer.Option("--no-user-data", rich_help_panel=IDENTITY_PANEL, help="Remove the user data.")
]
HostnameOption = Annotated[
    str | None,
    typer.Option(metavar="NAME", rich_help_panel=IDENTITY_PANEL, help="The guest's host name (RFC 1123)."),
]
NameOption = Annotated[
    str | None,
    typer.Option(metavar="TEXT", rich_help_panel=IDENTITY_PANEL, help="Display name, recorded."),
]
DescriptionOption = Annotated[
    str | None, typer.Option(metavar="TEXT", rich_help_panel=IDENTITY_PANEL, help="Description, recorded.")
]
MetadataOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="KEY=VALUE",
        rich_help_panel=IDENTITY_PANEL,
        help="The guest's metadata (repeatable); replaces it.",
    ),
]
NoMetadataOption = Annotated[
    bool, typer.Option("--no-metadata", rich_help_panel=IDENTITY_PANEL, help="Remove the metadata.")
]
AdminPasswordFileOption = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        rich_help_panel=IDENTITY_PANEL,
        help="File holding root's new password; hashed here, never sent in clear.",
    ),
]
SeedFormatOption = Annotated[
    str | None,
    typer.Option(
        metavar="FORMAT",
        rich_help_panel=IDENTITY_PANEL,
        help="cloud-init seed: nocloud (default) or config-drive (Nova's).",
    ),
]


def digests(checksum: str | None, sha256: str | None, sha512: str | None) -> tuple[str | None, str | None]:
    """``--checksum ALGO:HEX`` folded into ``--sha256``/``--sha512`` (which win where both are given)."""
    if checksum is None:
        return sha256, sha512
    algo, _, value = checksum.partition(":")
    if algo.lower() not in ("sha256", "sha512") or not value:
        raise ValueError(f"--checksum must be sha256:HEX or sha512:HEX, not {checksum!r}")
    if algo.lower() == "sha256":
        return sha256 or value, sha512
    return sha256, sha512 or value


def seed_format_of(value: str | None) -> SeedFormat | None:
    if value is None:
        return None
    if value not in ("nocloud", "config-drive"):
        raise ValueError(f"--seed-format must be nocloud or config-drive, not {value!r}")
    return "nocloud" if value == "nocloud" else "config-drive"
