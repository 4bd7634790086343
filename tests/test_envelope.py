"""The blob envelope: compression only when it pays, and verification on every decode."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import zstandard
from fuzzing import PROPERTY, decodes_within, mutated_bytes
from hypothesis import given
from hypothesis import strategies as st

from blobstore import BlobCorrupt, open_store
from blobstore.base import index_key
from blobstore.envelope import (
    CODEC_RAW,
    CODEC_ZSTD,
    HEADER,
    MAGIC,
    VERSION,
    decode,
    digest,
    encode,
    parse_header,
)
from indexer.catalog import MAX_TREE_BYTES, erofs_key, load_erofs, load_index

MAX_SIZE = (1 << 32) - 1  # docs/FORMAT.md: the largest decoded size a reader accepts


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


# -- damaged envelopes: BlobCorrupt, and memory bounded by what the bytes really hold -------


def _envelope(codec: int, size: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, codec, 0, size) + payload


def _unsized_frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=False).compress(data)


@pytest.mark.parametrize("size", [1 << 63, (1 << 64) - 1, 1 << 40, MAX_SIZE + 1])
@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
def test_a_huge_size_field_is_corruption_not_an_overflow(size: int, codec: int) -> None:
    """Once OverflowError (>= 2**63) or MemoryError (zstd allocated the header's size);
    in a mount's readahead either ended the daemon."""
    payload = _unsized_frame(b"x" * 1000) if codec == CODEC_ZSTD else b"x" * 1000
    with pytest.raises(BlobCorrupt, match="over the"):
        decodes_within(lambda: decode(_envelope(codec, size, payload)), (), 1 << 20)


def test_a_frame_without_content_size_is_streamed_within_the_header_size() -> None:
    data = b"abc" * 100_000
    frame = _unsized_frame(data)
    assert decode(_envelope(CODEC_ZSTD, len(data), frame), digest(data)) == data
    for size in (len(data) - 1, len(data) + 1, 0, MAX_SIZE):
        with pytest.raises(BlobCorrupt, match="does not match its header"):
            decodes_within(lambda s=size: decode(_envelope(CODEC_ZSTD, s, frame)), (),
                           4 * len(data))  # type: ignore[misc]
    with pytest.raises(BlobCorrupt, match="holds 300000 bytes"):
        decode(_envelope(CODEC_ZSTD, 1 << 30, zstandard.compress(data)))


def test_an_envelope_declaring_another_size_than_expected_is_refused_unopened() -> None:
    """A few kB of zeros can declare 1 GiB: a reader that knows the blob's size (or the
    most it may be) refuses it before decompressing a byte, in bounded memory."""
    data = b"x" * 5000
    bomb = _envelope(CODEC_ZSTD, 1 << 30, _unsized_frame(bytes(1 << 24)))
    for kwargs in ({"size": len(data)}, {"most": 4 << 20}):
        assert decodes_within(lambda k=kwargs: decode(bomb, digest(data), **k),  # type: ignore[misc]
                              (BlobCorrupt,), 1 << 20) is None
        with pytest.raises(BlobCorrupt, match="declares 1073741824 bytes"):
            decode(bomb, digest(data), **kwargs)
    envelope = encode(data)
    assert decode(envelope, digest(data), size=len(data), most=len(data)) == data
    with pytest.raises(BlobCorrupt, match="expected 4999"):
        decode(envelope, digest(data), size=len(data) - 1)


_SAMPLES = [b"", b"tiny", random.Random(0).randbytes(3000), b"compressible " * 400]
_ENVELOPES = [encode(d) for d in _SAMPLES] + [
    _envelope(CODEC_ZSTD, len(d), _unsized_frame(d)) for d in _SAMPLES[2:]]
_DATA = _SAMPLES + _SAMPLES[2:]


@PROPERTY
@given(st.integers(0, len(_ENVELOPES) - 1).flatmap(
    lambda n: st.tuples(st.just(n), mutated_bytes(_ENVELOPES[n], fields=(8,)))))
def test_any_damaged_envelope_is_blob_corrupt_within_bounded_memory(
        case: tuple[int, bytes]) -> None:
    n, damaged = case
    key = digest(_DATA[n])
    limit = 4 * len(damaged) + (2 << 20)  # a stream's read buffer is 1 MiB
    out = decodes_within(lambda: decode(damaged, key), (BlobCorrupt,), limit)
    assert out is None or bytes(out) == _DATA[n]  # the key lets nothing else through
    out = decodes_within(lambda: decode(damaged), (BlobCorrupt,), limit)
    assert out is None or len(out) == parse_header(damaged)[1]


def test_an_index_or_erofs_object_declaring_more_than_a_tree_is_refused_unopened(
    tmp_path: Path,
) -> None:
    """Only a store writer can plant one, but a reader still bounds what it inflates: 2 GiB,
    the largest tree (indexer/catalog.py), not the envelope's 4 GiB."""
    store = open_store(f"file://{tmp_path / 'store'}")
    bomb = _envelope(CODEC_ZSTD, MAX_TREE_BYTES + 1, _unsized_frame(bytes(1 << 20)))
    key = "ab" * 32
    store.put(index_key(key), bomb)
    store.put(erofs_key(key), bytes.fromhex(key) + bomb)
    with pytest.raises(BlobCorrupt, match=f"declares {MAX_TREE_BYTES + 1} bytes"):
        load_index(store, key)
    with pytest.raises(BlobCorrupt, match=f"declares {MAX_TREE_BYTES + 1} bytes"):
        load_erofs(store, key)
