"""Write-back as a download goes, so the fsync before the cache rename finds little left to do.

``sync_file_range(2)`` (Linux) starts writing a range of the file to disk without waiting for it, and
waits for an earlier range that was started before: the disk works while the network does, and the
dirty pages a download leaves in the page cache stay bounded. It promises nothing about durability
(no metadata, no disk cache flush): the final ``fsync`` still gives that, it just has less to do.
Python's ``os`` has no binding for it, so it is called through ctypes; where libc lacks it (not
Linux), nothing is done early and the fsync does all of it, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
# Start write-back every this many bytes; wait for the window before the last one.
WINDOW_BYTES = 8 << 20


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).sync_file_range
    except AttributeError:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _libc_sync_file_range()


class WriteBack:
    """Tracks how far a file was written and keeps its write-back one window behind."""

    def __init__(self, fd: int, start: int, window: int = WINDOW_BYTES) -> None:
        self.fd = fd
        self.window = window
        self.written = start  # bytes in the file (all handed to the kernel)
        self.started = start  # write-back started up to here
        self.waited = start  # write-back finished up to here
        self.enabled = _sync_file_range is not None

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more were written to the kernel; start or wait for write-back as due."""
        self.written += nbytes
        if not self.enabled or self.written - self.started < self.window:
            return
        self._call(self.started, self.written - self.started, SYNC_FILE_RANGE_WRITE)
        # Wait for the window started last time: by now the disk has mostly done it.
        if self.started > self.waited:
            flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
            self._call(self.waited, self.started - self.waited, flags)
            self.waited = self.started
        self.started = self.written

    def _call(self, offset: int, nbytes: int, flags: int) -> None:
        assert _sync_file_range is not None
        if _sync_file_range(self.fd, offset, nbytes, flags) != 0:
            error = ctypes.get_errno()
            # A file system that cannot do it (ESPIPE, EINVAL): the final fsync does it all.
            if error in (22, 29, 95):
                self.enabled = False
                return
            raise OSError(error, os.strerror(error))
