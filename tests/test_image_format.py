"""check_image and the header parser against real images from qemu-img and hand-made hostile ones.

Every refused image must be refused with a reason a person can read, and removed from the cache, so
that nothing later (the overlay, libvirt, an operator's ``qemu-img info``) opens what it names.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities import image_format
from activities.errors import ImageNotFound, ImageTooLarge, UnsafeImage
from activities.images import ImageActivities
from activities.state import StateDir
from devtools.guest import write_image
from devtools.image_server import ImageServer
from devtools.testbed.e2e import LOOPBACK_POLICY
from workflows.models import CheckedImage, CheckImageInput, FetchImageInput

MiB = 1 << 20
TiB = 1 << 40
LIMIT = TiB


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "state")
    state.create()
    return state


@pytest.fixture
def images(state: StateDir) -> ImageActivities:
    return ImageActivities(state, address_policy=LOOPBACK_POLICY)


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def into_cache(state: StateDir, source: Path) -> str:
    """Put ``source`` in the cache under a made-up SHA-256: check_image trusts the name, not the bytes."""
    sha256 = hashlib.sha256(str(source).encode()).hexdigest()
    shutil.copyfile(source, state.image_path(sha256))
    return sha256


async def check(images: ImageActivities, sha256: str, limit: int = LIMIT) -> CheckedImage:
    result: CheckedImage = await ActivityEnvironment().run(
        images.check_image, CheckImageInput(sha256=sha256, max_virtual_size_bytes=limit)
    )
    return result


def patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as image:
        image.seek(offset)
        image.write(struct.pack(fmt, *values))


def read(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as image:
        image.seek(offset)
        (value,) = struct.unpack(fmt, image.read(struct.calcsize(fmt)))
        return int(value)


# qcow2 header fields (big-endian) at their offsets.
QCOW2_BACKING_OFFSET, QCOW2_SIZE, QCOW2_CRYPT_METHOD = 8, 24, 32
QCOW2_INCOMPATIBLE, QCOW2_HEADER_LENGTH = 72, 100


# --- accepted -------------------------------------------------------------------------------------


async def test_raw_image_is_accepted(tmp_path: Path, state: StateDir, images: ImageActivities) -> None:
    sha256 = into_cache(state, write_image(tmp_path / "boot.raw", "RAW-OK", "raw", size=2 * MiB))

    checked = await check(images, sha256)

    assert checked == CheckedImage(sha256=sha256, format="raw", virtual_size=2 * MiB)
    assert state.image_path(sha256).exists()


@pytest.mark.parametrize("compat", ["1.1", "0.10"], ids=["qcow2-v3", "qcow2-v2"])
async def test_qcow2_image_is_accepted(
    tmp_path: Path, state: StateDir, images: ImageActivities, compat: str
) -> None:
    source = write_image(tmp_path / "boot.qcow2", "QCOW2-OK", "qcow2", size=4 * MiB)
    qemu_img("amend", "-f", "qcow2", "-o", f"compat={compat}", source)
    assert read(source, 4, ">I") == {"1.1": 3, "0.10": 2}[compat]
    sha256 = into_cache(state, source)

    checked = await check(images, sha256)

    assert checked == CheckedImage(sha256=sha256, format="qcow2", virtual_size=4 * MiB)
    assert state.image_path(sha256).exists()


async def test_format_comes_from_the_header_not_the_name(
    tmp_path: Path, state: StateDir, images: ImageActivities
) -> None:
    """A raw image published as ``.qcow2`` is fetched and checked as what it is: raw."""
    served = tmp_path / "served"
    served.mkdir()
    lying = write_image(served / "ubuntu.qcow2", "NAMED-QCOW2", "raw", size=2 * MiB)
    assert image_format.inspect_header(lying) == "raw"
    server = ImageServer(served)
    await server.start()
    try:
        cached = await ActivityEnvironment().run(
            images.fetch_image, FetchImageInput(url=server.url(lying.name), max_bytes=8 * MiB)
        )
    finally:
        await server.stop()

    checked = await check(images, cached.sha256)

    assert (checked.format, checked.virtual_size) == ("raw", 2 * MiB)


async def test_missing_image_is_not_found(images: ImageActivities) -> None:
    with pytest.raises(ImageNotFound) as failure:
        await check(images, "0" * 64)
    assert failure.value.non_retryable


# --- refused: the hostile and the foreign ---------------------------------------------------------


def backing_file(tmp: Path) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", tmp / "x.qcow2")
    return tmp / "x.qcow2"


def backing_format_extension_only(tmp: Path) -> Path:
    """The backing file's name zeroed out, its format extension left: still refused."""
    path = backing_file(tmp)
    patch(path, QCOW2_BACKING_OFFSET, ">QI", 0, 0)
    return path


def data_file(tmp: Path) -> Path:
    options = f"data_file={tmp / 'other.raw'},data_file_raw=on"
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, tmp / "x.qcow2", "1M")
    return tmp / "x.qcow2"


def data_file_extension_only(tmp: Path) -> Path:
    """The external-data-file bit cleared, the extension naming the file left: still refused."""
    path = data_file(tmp)
    features = read(path, QCOW2_INCOMPATIBLE, ">Q")
    patch(path, QCOW2_INCOMPATIBLE, ">Q", features & ~image_format.QCOW2_DATA_FILE)
    return path


def plain_qcow2(tmp: Path) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", tmp / "x.qcow2", "1M")
    return tmp / "x.qcow2"


def unknown_incompatible_feature(tmp: Path) -> Path:
    path = plain_qcow2(tmp)
    patch(path, QCOW2_INCOMPATIBLE, ">Q", read(path, QCOW2_INCOMPATIBLE, ">Q") | 1 << 40)
    return path


def marked_corrupt(tmp: Path) -> Path:
    path = plain_qcow2(tmp)
    patch(path, QCOW2_INCOMPATIBLE, ">Q", read(path, QCOW2_INCOMPATIBLE, ">Q") | 1 << 1)
    return path


def header_length_past_file(tmp: Path) -> Path:
    path = plain_qcow2(tmp)
    patch(path, QCOW2_HEADER_LENGTH, ">I", 1 << 30)
    return path


def truncated_qcow2(tmp: Path) -> Path:
    path = tmp / "x.qcow2"
    path.write_bytes(plain_qcow2(tmp).read_bytes()[:48])
    return path


def l1_table_too_small(tmp: Path) -> Path:
    """A header our parser has no objection to, that qemu-img itself refuses to open."""
    path = plain_qcow2(tmp)
    patch(path, QCOW2_SIZE, ">Q", 1 << 45)  # virtual size far beyond what the one-entry L1 table maps
    return path


def encrypted_qcow2(tmp: Path) -> Path:
    """crypt_method set (qemu-img's own LUKS encryption spends seconds in PBKDF and is flaky here)."""
    path = plain_qcow2(tmp)
    patch(path, QCOW2_CRYPT_METHOD, ">I", 2)
    return path


def created(fmt: str, *options: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        qemu_img("create", "-q", "-f", fmt, *options, tmp / f"x.{fmt}", "1M")
        return tmp / f"x.{fmt}"

    return build


def luks(tmp: Path) -> Path:
    """A LUKS v1 header by hand: qemu-img would spend seconds in PBKDF to make a real one."""
    path = tmp / "x.luks"
    path.write_bytes((b"LUKS\xba\xbe" + struct.pack(">H", 1) + b"aes".ljust(32, b"\x00")).ljust(MiB, b"\x00"))
    return path


VMDK_DESCRIPTOR = """# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 2048 FLAT "/etc/passwd" 0

# The Disk Data Base
#DDB
ddb.virtualHWVersion = "4"
"""


def vmdk_descriptor(tmp: Path) -> Path:
    path = tmp / "x.vmdk"
    path.write_text(VMDK_DESCRIPTOR)
    return path


def vmdk_descriptor_without_banner(tmp: Path) -> Path:
    """No magic at all: qemu still probes ``version=1`` on the first line as VMDK."""
    path = tmp / "x.img"
    path.write_text(VMDK_DESCRIPTOR.removeprefix("# Disk DescriptorFile\n"))
    return path


def vmdk_descriptor_after_comments(tmp: Path) -> Path:
    path = tmp / "x.img"
    path.write_text("# made by hand\n  \n" + VMDK_DESCRIPTOR.removeprefix("# Disk DescriptorFile\n"))
    return path


REFUSED: list[tuple[str, Callable[[Path], Path], str]] = [
    ("qcow2-backing-file", backing_file, "backing file"),
    ("qcow2-backing-format-extension", backing_format_extension_only, "backing format"),
    ("qcow2-external-data-file", data_file, "external data file"),
    ("qcow2-data-file-extension", data_file_extension_only, "external data file"),
    ("qcow2-unknown-incompatible-feature", unknown_incompatible_feature, "unknown incompatible features"),
    ("qcow2-marked-corrupt", marked_corrupt, "corrupt"),
    ("qcow2-header-length", header_length_past_file, "header length"),
    ("qcow2-truncated", truncated_qcow2, "truncated"),
    ("qcow2-refused-by-qemu-img", l1_table_too_small, "qemu-img info failed"),
    ("qcow2-encrypted", encrypted_qcow2, "encrypted"),
    ("qcow-v1", created("qcow"), "format qcow is not accepted"),
    ("vmdk-sparse", created("vmdk"), "format vmdk is not accepted"),
    (
        "vmdk-flat-descriptor",
        created("vmdk", "-o", "subformat=monolithicFlat"),
        "format vmdk is not accepted",
    ),
    ("vmdk-descriptor-to-etc-passwd", vmdk_descriptor, "format vmdk is not accepted"),
    ("vmdk-descriptor-without-banner", vmdk_descriptor_without_banner, "format vmdk is not accepted"),
    ("vmdk-descriptor-after-comments", vmdk_descriptor_after_comments, "format vmdk is not accepted"),
    ("vhdx", created("vhdx"), "format vhdx is not accepted"),
    ("vdi", created("vdi"), "format vdi is not accepted"),
    ("qed", created("qed"), "format qed is not accepted"),
    ("vpc-dynamic", created("vpc"), "format vpc is not accepted"),
    ("vpc-fixed", created("vpc", "-o", "subformat=fixed"), "format vpc is not accepted"),
    ("parallels", created("parallels"), "format parallels is not accepted"),
    ("luks", luks, "format luks is not accepted"),
]


@pytest.mark.parametrize(("build", "reason"), [(b, r) for _, b, r in REFUSED], ids=[i for i, _, _ in REFUSED])
async def test_unsafe_image_is_refused_and_removed(
    tmp_path: Path,
    state: StateDir,
    images: ImageActivities,
    build: Callable[[Path], Path],
    reason: str,
) -> None:
    made = tmp_path / "made"
    made.mkdir()
    sha256 = into_cache(state, build(made))

    with pytest.raises(UnsafeImage, match=reason) as failure:
        await check(images, sha256)

    assert failure.value.non_retryable
    assert failure.value.type == "UnsafeImage"
    assert not state.image_path(sha256).exists()


@pytest.mark.parametrize(
    "build", [vmdk_descriptor_without_banner, vmdk_descriptor_after_comments], ids=["bare", "comments"]
)
def test_qemu_img_itself_takes_bannerless_descriptor_for_vmdk(
    tmp_path: Path, build: Callable[[Path], Path]
) -> None:
    """The hostile case is real: probing, qemu-img reads these as VMDK with an extent in /etc."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(build(tmp_path))], check=True, capture_output=True
    ).stdout
    info = json.loads(out)
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["extents"][0]["filename"] == "/etc/passwd"


def test_raw_images_are_not_taken_for_descriptors(tmp_path: Path) -> None:
    """What a raw disk starts with (zeros, a boot sector, text that is no descriptor) stays raw."""
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(MiB))
    text = tmp_path / "text.img"
    text.write_bytes(b"# a comment\n\nversion: not a vmdk\n" + bytes(MiB))
    boot = write_image(tmp_path / "boot.img", "MARKER")
    assert [image_format.inspect_header(p) for p in (zeros, text, boot)] == ["raw", "raw", "raw"]


# --- refused: too large ---------------------------------------------------------------------------


async def test_qcow2_with_huge_virtual_size_is_too_large(
    tmp_path: Path, state: StateDir, images: ImageActivities
) -> None:
    huge = write_image(tmp_path / "huge.qcow2", "HUGE", fmt="qcow2")
    qemu_img("resize", "-q", "-f", "qcow2", huge, "64T")
    sha256 = into_cache(state, huge)
    assert state.image_path(sha256).stat().st_size < 2 * MiB

    with pytest.raises(ImageTooLarge, match=f"virtual size of {64 * TiB} bytes, over the limit") as failure:
        await check(images, sha256, limit=TiB)

    assert failure.value.non_retryable
    # The limit is the request's; the image may back other instances, so it stays cached.
    assert state.image_path(sha256).exists()


async def test_raw_image_over_limit_is_too_large(
    tmp_path: Path, state: StateDir, images: ImageActivities
) -> None:
    sha256 = into_cache(state, write_image(tmp_path / "big.raw", "BIG", "raw", size=4 * MiB))

    with pytest.raises(ImageTooLarge, match="over the limit"):
        await check(images, sha256, limit=4 * MiB - 1)

    assert state.image_path(sha256).exists()
