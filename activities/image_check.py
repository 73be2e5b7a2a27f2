"""Image safety: decide from an image's own header what it is, and refuse what could reach outside it.

The file was written by an untrusted server: its header is parsed in Python first
(``image_format``), and ``qemu-img`` is asked only with an explicit format, under resource limits.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from activities import image_format, qemu_img
from activities.checkpoints import Checkpoints
from activities.errors import DiskToolFailed, EmptyImage, ImageNotFound, ImageTooLarge, UnsafeImage
from activities.heartbeat import keep_alive
from activities.state import StateDir, write_atomically
from workflows.models import CheckedImage, CheckImageInput


class ImageCheck:
    def __init__(self, state: StateDir, checkpoints: Checkpoints) -> None:
        self.state = state
        self.checkpoints = checkpoints

    async def check(self, request: CheckImageInput) -> CheckedImage:
        """Decide from the file's own header what it is, refuse what could reach outside it."""
        self.state.create()
        path = self.state.image_path(request.sha256)
        if not path.exists():
            raise ImageNotFound(f"image {request.sha256} is not in this host's cache")
        verdict = self.state.check_verdict(request.sha256)
        if verdict.exists():
            # Cached images never change after their rename, so one full check per image suffices.
            checked = CheckedImage.model_validate_json(verdict.read_text())
            fmt, virtual_size = checked.format, checked.virtual_size
        else:
            async with keep_alive():
                await self.checkpoints.reach("check.before-inspect")
                try:
                    fmt = await asyncio.to_thread(image_format.inspect_header, path)
                    info = await qemu_img.image_info(str(path), fmt)
                    image_format.check_info(info, fmt)
                    virtual_size = int(info["virtual-size"])
                    await _refuse_empty(path, fmt, virtual_size, request.sha256)
                except EmptyImage:
                    path.unlink(missing_ok=True)
                    raise
                except (UnsafeImage, DiskToolFailed) as err:
                    path.unlink(missing_ok=True)
                    raise UnsafeImage(f"image {request.sha256} refused: {err.message}") from None
            passed = CheckedImage(sha256=request.sha256, format=fmt, virtual_size=virtual_size)
            write_atomically(verdict, passed.model_dump_json())
        if request.declared_format and fmt != request.declared_format:
            # The image is what its header says, and other instances may use it: it stays cached.
            raise UnsafeImage(
                f"image {request.sha256} was declared {request.declared_format}, its header says {fmt}"
            )
        if virtual_size > request.max_virtual_size_bytes:
            # The limit belongs to this request, not to the image, which other instances may use:
            # it stays in the cache.
            raise ImageTooLarge(
                f"image {request.sha256} has a virtual size of {virtual_size} bytes, over the "
                f"limit of {request.max_virtual_size_bytes}"
            )
        return CheckedImage(sha256=request.sha256, format=fmt, virtual_size=virtual_size)


async def _refuse_empty(path: Path, fmt: str, virtual_size: int, sha256: str) -> None:
    """An image with nothing to boot would "rebuild" the instance onto a blank disk: refuse it now."""
    if virtual_size == 0:
        raise EmptyImage(f"image {sha256} is empty (virtual size 0): there is nothing to boot")
    if fmt == "raw":
        empty = await asyncio.to_thread(image_format.raw_start_is_empty, path)
    else:
        length = min(virtual_size, image_format.EMPTY_PROBE_BYTES)
        empty = image_format.mapped_start_is_empty(await qemu_img.image_map(str(path), fmt, length))
    if empty:
        raise EmptyImage(
            f"image {sha256} holds only zeros in its first {image_format.EMPTY_PROBE_BYTES >> 20} MiB: "
            "no boot sector, partition table or file system to boot from"
        )
