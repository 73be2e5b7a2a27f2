"""Real Linux guest images for the tests and benches, built here from Debian's packages.

``python -m devtools.real_guest`` builds (or finds) them and prints their paths. The images are made by
this script, never downloaded: ``mmdebstrap`` makes one minbase bookworm root tree with a cloud kernel,
systemd, dbus (so the ACPI power button and the agent's ``guest-shutdown`` work), cloud-init, the QEMU
guest agent and sshd; each variant is an unpartitioned 2 GiB ext4 disk booted by extlinux, as qcow2.

- ``a`` and ``b``: reach multi-user, then print ``real image A`` (or ``B``) on ttyS0 and keep the same
  name in ``/etc/rebuild-image``, where the guest agent's ``guest-exec`` can read it.
- ``panic``: the kernel is told to run ``/bin/false`` as init, so it panics and never reaches multi-user.
- ``stuck``: a sound kernel and systemd told to boot into ``emergency.target``: it runs, prints, and waits
  at a locked root account's prompt for ever, never reaching multi-user (nor starting the guest agent).

The result lives under ``/var/cache/durable-rebuild/real-guest/<key>/``, where the key is a hash of the
recipe (the constants and the functions that build): a change to it builds anew, an unchanged recipe is
built at most once per machine.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("REBUILD_REAL_GUEST_CACHE", "/var/cache/durable-rebuild/real-guest"))
SUITE = "bookworm"
PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    "qemu-guest-agent",
    "openssh-server",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
)
DISK_BYTES = 2 << 30
VARIANTS = ("a", "b", "panic", "stuck")
# What each broken variant adds to the kernel command line.
BROKEN_BOOTS = {"panic": " init=/bin/false", "stuck": " systemd.unit=emergency.target"}
KERNEL_ARGS = "root=/dev/vda rw console=ttyS0"
MARKER_UNIT = """[Unit]
Description=Tell the serial console which image booted
DefaultDependencies=no
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "real image {name} reached multi-user" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""
# cloud-init stays as a stock image has it: its generator (ds-identify) finds no datasource here and
# disables it for the boot. (A one-entry datasource_list would force it on: 60 s more under TCG.)
FSTAB = "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"
# As Debian's cloud images have it. Without it cloud-init's locale module asks Debian's locale-gen (which
# ignores its argument) for en_US.UTF-8, and update-locale then fails: cloud-init reports an error.
LOCALE = "LANG=C.UTF-8\n"
INTERFACES = "auto lo\niface lo inet loopback\n"


class RealGuestBuildError(RuntimeError):
    """The image could not be built: a tool is missing or failed. The message says which."""


@dataclass(frozen=True)
class RealGuestImages:
    directory: Path
    a: Path
    b: Path
    panic: Path
    stuck: Path
    # Seconds the build took on this machine, when it was built (read back from build.json).
    build_seconds: float
    built_now: bool

    @staticmethod
    def marker(name: str) -> str:
        """What variant ``name`` ("A" or "B") prints on its serial console once at multi-user."""
        return f"real image {name} reached multi-user"


def recipe_key() -> str:
    recipe = [
        SUITE,
        PACKAGES,
        DISK_BYTES,
        VARIANTS,
        BROKEN_BOOTS,
        KERNEL_ARGS,
        MARKER_UNIT,
        FSTAB,
        LOCALE,
        INTERFACES,
    ]
    code = [inspect.getsource(step) for step in (_customize, _build_disk, build)]
    return hashlib.sha256(repr((recipe, code)).encode()).hexdigest()[:16]


def _run(*command: str) -> None:
    try:
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    except FileNotFoundError:
        raise RealGuestBuildError(f"{command[0]} is not installed") from None
    except subprocess.CalledProcessError as err:
        output = (err.stderr or b"").decode(errors="replace")[-3000:]
        raise RealGuestBuildError(f"{' '.join(command)} failed ({err.returncode}): {output}") from None


@contextlib.contextmanager
def _mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    _run("mount", "-o", "loop", str(image), str(mountpoint))
    try:
        yield mountpoint
    finally:
        _run("umount", str(mountpoint))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _kernel_and_initrd(root: Path) -> tuple[str, str]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise RealGuestBuildError("the root tree has no kernel or initrd in /boot")
    return f"/boot/{kernels[-1].name}", f"/boot/{initrds[-1].name}"


def _customize(root: Path, variant: str) -> None:
    _write(root / "etc/fstab", FSTAB)
    _write(root / "etc/default/locale", LOCALE)
    _write(root / "etc/hostname", f"real-guest-{variant}\n")
    _write(root / "etc/network/interfaces", INTERFACES)
    name = variant.upper()
    _write(root / "etc/rebuild-image", f"{name}\n")
    _write(root / "etc/systemd/system/rebuild-marker.service", MARKER_UNIT.format(name=name))
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (wants / "rebuild-marker.service").symlink_to("/etc/systemd/system/rebuild-marker.service")
    kernel, initrd = _kernel_and_initrd(root)
    extra = BROKEN_BOOTS.get(variant, "")
    _write(
        root / "boot/extlinux/extlinux.conf",
        f"DEFAULT linux\nTIMEOUT 0\nPROMPT 0\nLABEL linux\n  KERNEL {kernel}\n  INITRD {initrd}\n"
        f"  APPEND {KERNEL_ARGS}{extra}\n",
    )


def _build_disk(root_tar: Path, work: Path, variant: str, out: Path) -> None:
    raw = work / f"{variant}.raw"
    with open(raw, "wb") as disk:
        disk.truncate(DISK_BYTES)
    _run("mkfs.ext4", "-q", "-F", "-L", "root", str(raw))
    mountpoint = work / f"mnt-{variant}"
    mountpoint.mkdir()
    with _mounted(raw, mountpoint) as root:
        _run("tar", "-xpf", str(root_tar), "-C", str(root), "--numeric-owner")
        _customize(root, variant)
        _run("extlinux", "--install", str(root / "boot/extlinux"))
    _run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out))
    raw.unlink()


def build(directory: Path) -> float:
    """Build every variant into ``directory`` (which must not exist yet); returns the seconds it took."""
    began = time.monotonic()
    for tool in ("mmdebstrap", "mkfs.ext4", "extlinux", "qemu-img", "mount"):
        if shutil.which(tool) is None:
            raise RealGuestBuildError(f"{tool} is not installed (apt-get install mmdebstrap extlinux ...)")
    if os.geteuid() != 0:
        raise RealGuestBuildError("building the real guest needs root (loop mount, file ownership)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        root_tar = work / "root.tar"
        _run(
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            "--format=tar",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(root_tar),
        )
        staged = work / "images"
        staged.mkdir()
        for variant in VARIANTS:
            _build_disk(root_tar, work, variant, staged / f"{variant}.qcow2")
            (staged / f"{variant}.qcow2").chmod(0o644)
        seconds = time.monotonic() - began
        (staged / "build.json").write_text(
            json.dumps({"seconds": round(seconds, 1), "suite": SUITE, "packages": list(PACKAGES)}) + "\n"
        )
        staged.chmod(0o755)
        staged.rename(directory)
    return seconds


def ensure_images(cache_root: Path = CACHE_ROOT) -> RealGuestImages:
    """The images for this recipe: from the cache, or built now (once, under a lock)."""
    directory = cache_root / recipe_key()
    built_now = False
    cache_root.mkdir(parents=True, exist_ok=True)
    for parent in (cache_root, cache_root.parent):
        # QEMU's unprivileged user reads these images as backing files: it must traverse to them.
        parent.chmod(parent.stat().st_mode | 0o755)
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "build.json").exists():
            build(directory)
            built_now = True
    info = json.loads((directory / "build.json").read_text())
    return RealGuestImages(
        directory=directory,
        a=directory / "a.qcow2",
        b=directory / "b.qcow2",
        panic=directory / "panic.qcow2",
        stuck=directory / "stuck.qcow2",
        build_seconds=float(info["seconds"]),
        built_now=built_now,
    )


def image_sha256(path: Path) -> str:
    """The digest a rebuild of this image is asked for (``--sha256``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as image:
        while block := image.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args()
    try:
        images = ensure_images()
    except RealGuestBuildError as err:
        print(f"real guest: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    state = "built now" if images.built_now else "cached"
    print(f"real guest images ({state}; the build took {images.build_seconds:.1f} s): {images.directory}")
    for path in (images.a, images.b, images.panic, images.stuck):
        print(f"  {path} ({path.stat().st_size >> 20} MiB)")


if __name__ == "__main__":
    main()
