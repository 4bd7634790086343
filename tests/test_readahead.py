"""How far ahead a mount reads: further for a file read through than after a seek.
(How the kernel is asked to read cache files ahead: tests/test_pagecache.py.)"""

from __future__ import annotations

from cafs.daemon.readahead import CHUNKS, STREAM_CHUNKS, STREAM_SLACK, Cursor

MiB = 1 << 20


def test_a_file_read_through_is_streaming_and_a_jump_is_not() -> None:
    file = Cursor()
    assert not file.streaming(0, MiB)  # the first read: nothing to follow yet
    assert file.streaming(MiB, 2 * MiB)
    assert file.streaming(4 * MiB, 5 * MiB)  # the kernel's requests out of order
    assert file.streaming(3 * MiB, 4 * MiB)
    assert not file.streaming(4 * MiB + STREAM_SLACK + 1, 6 * MiB + STREAM_SLACK)  # a seek
    assert file.streaming(6 * MiB + STREAM_SLACK, 7 * MiB + STREAM_SLACK)


def test_a_file_read_through_is_read_further_ahead() -> None:
    file = Cursor()
    assert file.ahead(0, MiB) == CHUNKS
    assert file.ahead(MiB, 2 * MiB) == STREAM_CHUNKS
    assert file.ahead(100 * MiB, 101 * MiB) == CHUNKS
