"""Write-back started as a download goes: one window behind, never ahead of what was written."""

from __future__ import annotations

import os
from pathlib import Path

from activities.writeback import WriteBack

MiB = 1 << 20


def test_write_back_follows_the_writes_one_window_behind(tmp_path: Path) -> None:
    with open(tmp_path / "image.part", "wb") as out:
        tracker = WriteBack(out.fileno(), 0, window=4 * MiB)
        assert tracker.enabled, "sync_file_range is in Linux's libc"
        chunk = os.urandom(MiB)
        for written in range(1, 11):
            out.write(chunk)
            out.flush()
            tracker.advance(len(chunk))
            assert tracker.waited <= tracker.started <= tracker.written == written * MiB
        assert tracker.started == 8 * MiB  # started at 4 and 8 MiB
        assert tracker.waited == 4 * MiB  # the first window waited for when the second began
    assert (tmp_path / "image.part").stat().st_size == 10 * MiB


def test_a_resumed_file_starts_counting_at_its_size(tmp_path: Path) -> None:
    path = tmp_path / "image.part"
    path.write_bytes(b"x" * (3 * MiB))
    with open(path, "ab") as out:
        tracker = WriteBack(out.fileno(), out.tell(), window=2 * MiB)
        out.write(b"y" * (2 * MiB))
        out.flush()
        tracker.advance(2 * MiB)
        assert (tracker.written, tracker.started) == (5 * MiB, 5 * MiB)


def test_where_it_cannot_be_done_nothing_fails(tmp_path: Path) -> None:
    read, write = os.pipe()
    try:
        tracker = WriteBack(write, 0, window=1)
        tracker.advance(10)  # a pipe has no pages to write back: ESPIPE
        assert not tracker.enabled
        tracker.advance(10)
        assert tracker.written == 20
    finally:
        os.close(read)
        os.close(write)
