"""Hole punching on the file systems the tests run on: what bounded logs are built from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobworker.worker.holes import (
    ALIGN,
    OutputCap,
    dropped_bytes,
    next_data,
    next_hole,
    punch_hole,
)

MiB = 1 << 20


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _pattern(start: int, length: int) -> bytes:
    return bytes((start + i) % 251 for i in range(length))


def test_a_punched_range_frees_blocks_keeps_size_and_reads_as_a_hole(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _append(path, _pattern(0, 4 * MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        before = os.fstat(fd).st_blocks * 512
        punch_hole(fd, MiB, 2 * MiB)
        after = os.fstat(fd)
        assert after.st_size == 4 * MiB, "the size must not change"
        assert before - after.st_blocks * 512 == 2 * MiB
        assert next_hole(fd, 0) == MiB
        assert next_data(fd, MiB) == 3 * MiB
        assert dropped_bytes(fd) == 2 * MiB
        assert os.pread(fd, 16, 3 * MiB) == _pattern(3 * MiB, 16), "the tail must be intact"
    finally:
        os.close(fd)


def test_an_append_only_writer_keeps_appending_after_a_punch(tmp_path: Path) -> None:
    path = tmp_path / "log"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(writer, b"a" * (2 * MiB))
        fd = os.open(path, os.O_WRONLY)
        punch_hole(fd, 0, MiB)
        os.close(fd)
        os.write(writer, b"b")
        assert os.stat(path).st_size == 2 * MiB + 1
    finally:
        os.close(writer)


def test_no_data_past_the_end_and_no_hole_in_a_dense_file(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _append(path, b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert next_data(fd, 100) is None
        assert next_hole(fd, 0) == 100, "the end of a file is where its first hole starts"
        assert dropped_bytes(fd) == 0
    finally:
        os.close(fd)


def test_the_cap_keeps_the_head_and_the_latest_tail_within_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _append(path, b"")
    cap = OutputCap(path, 2 * MiB)
    try:
        written = 0
        for _ in range(20):
            _append(path, _pattern(written, 300_001))
            written += 300_001
            cap.trim()
            assert os.stat(path).st_blocks * 512 <= 2 * MiB + ALIGN
        assert cap.head == MiB
        assert cap.dropped is not None
        head, resume = cap.dropped
        assert (head, resume % ALIGN) == (MiB, 0)
        assert written - resume <= MiB, "the tail kept must be within its half of the cap"
        fd = os.open(path, os.O_RDONLY)
        try:
            assert dropped_bytes(fd) == resume - head
            assert next_hole(fd, 0) == head
            assert next_data(fd, head) == resume
            assert os.pread(fd, head, 0) == _pattern(0, head)
            assert os.pread(fd, written - resume, resume) == _pattern(resume, written - resume)
        finally:
            os.close(fd)
    finally:
        cap.close()


def test_a_cap_taken_over_from_an_earlier_server_knows_what_was_dropped(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _append(path, _pattern(0, 5 * MiB))
    first = OutputCap(path, 2 * MiB)
    first.trim()
    first.close()
    again = OutputCap(path, 2 * MiB)
    try:
        assert again.dropped == first.dropped
        assert again.trim() == 0, "nothing new to drop"
    finally:
        again.close()


def test_an_output_cap_below_one_mebibyte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _append(path, b"")
    with pytest.raises(ValueError, match="output cap"):
        OutputCap(path, MiB - 1)
