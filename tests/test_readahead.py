"""How far ahead a mount reads: further for a file read through than after a seek.
(How the kernel is asked to read cache files ahead: tests/test_pagecache.py.)"""

from __future__ import annotations

from cafs.daemon.fs import STREAM_SLACK, _OpenFile
from indexer.format import Inode

MiB = 1 << 20


def test_a_file_read_through_is_streaming_and_a_jump_is_not() -> None:
    node = Inode(2, 0o100644, 0, 0, 1, 100 * 4 * MiB, 0, 0, 0, 100, 0, 0)
    file = _OpenFile(node, ["k"] * 100)
    assert not file.streaming(0, MiB)  # the first read: nothing to follow yet
    assert file.streaming(MiB, 2 * MiB)
    assert file.streaming(4 * MiB, 5 * MiB)  # the kernel's requests out of order
    assert file.streaming(3 * MiB, 4 * MiB)
    assert not file.streaming(4 * MiB + STREAM_SLACK + 1, 6 * MiB + STREAM_SLACK)  # a seek
    assert file.streaming(6 * MiB + STREAM_SLACK, 7 * MiB + STREAM_SLACK)
