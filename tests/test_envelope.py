"""The blob envelope: compression only when it pays, and verification on every decode."""

from __future__ import annotations

import os

import pytest

from blobstore import BlobCorrupt
from blobstore.envelope import CODEC_RAW, CODEC_ZSTD, decode, digest, encode, parse_header


def test_compressible_data_is_compressed_and_round_trips() -> None:
    data = b"hello world " * 10_000
    env = encode(data)
    assert parse_header(env)[0] == CODEC_ZSTD and len(env) < len(data) // 10
    assert decode(env, digest(data)) == data


def test_incompressible_data_is_stored_raw() -> None:
    data = os.urandom(1 << 16)
    env = encode(data)
    assert parse_header(env) == (CODEC_RAW, len(data))
    assert decode(env, digest(data)) == data


def test_empty_blob() -> None:
    assert decode(encode(b""), digest(b"")) == b""


@pytest.mark.parametrize("compressible", [True, False])
def test_any_flipped_byte_is_caught(compressible: bool) -> None:
    data = b"abc" * 5000 if compressible else os.urandom(5000)
    env = bytearray(encode(data))
    env[len(env) // 2] ^= 0x40
    with pytest.raises(BlobCorrupt):
        decode(bytes(env), digest(data))


def test_wrong_key_and_garbage_are_refused() -> None:
    with pytest.raises(BlobCorrupt):
        decode(encode(b"one"), digest(b"two"))
    with pytest.raises(BlobCorrupt):
        decode(b"not an envelope at all")
