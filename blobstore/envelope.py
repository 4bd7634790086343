"""The self-describing blob envelope: a 16-byte header, then raw or zstd bytes.

Every blob is keyed by the BLAKE3 of its *decoded* bytes and verified on every decode, so a
corrupt store or cache can never hand bad bytes to a reader. Layout in docs/FORMAT.md.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import blake3
import zstandard

from blobstore.errors import BlobCorrupt

MAGIC = b"CAFB"
VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
HEADER = struct.Struct("<4sBBHQ")  # magic, version, codec, reserved, raw size
HEADER_SIZE = HEADER.size
ZSTD_LEVEL = 3
# Compressed only if it saves at least this share: decompression costs CPU on every miss, and
# most on the data that compresses least (float32 weights: 7.5% saved, decompressed at
# ~720 MB/s, 1.5 CPU-s per GiB, more than the 0.6 s per GiB the saving buys on 1 Gbit/s).
MIN_SAVING = 0.10
# Below this, zstd rarely saves enough to pay for its frame.
MIN_COMPRESS_SIZE = 64
# The largest decoded size a reader accepts: a chunk is at most 4 GiB - 1 (the index's u32
# chunk size), an index or EROFS image far less. A larger header is corruption, refused
# before anything is allocated for it.
MAX_SIZE = (1 << 32) - 1
_STREAM_PIECE = 1 << 20  # output read at a time from a frame that does not state its size


def digest(data: bytes | memoryview) -> str:
    """BLAKE3 hex digest; large inputs use several threads (blake3 releases the GIL)."""
    threads = blake3.blake3.AUTO if len(data) >= (1 << 20) else 1
    return blake3.blake3(data, max_threads=threads).hexdigest()


def encode(data: bytes | memoryview, compress: bool = True, level: int = ZSTD_LEVEL) -> bytes:
    """Wrap `data`, compressing it with zstd (at `level`) only when that saves space."""
    raw = bytes(data)
    if compress and len(raw) >= MIN_COMPRESS_SIZE:
        packed = zstandard.ZstdCompressor(level=level).compress(raw)
        if len(packed) <= len(raw) * (1 - MIN_SAVING):
            return HEADER.pack(MAGIC, VERSION, CODEC_ZSTD, 0, len(raw)) + packed
    return HEADER.pack(MAGIC, VERSION, CODEC_RAW, 0, len(raw)) + raw


def envelope_limit(size: int) -> int:
    """The largest envelope of a blob of `size` decoded bytes: `encode` keeps zstd only
    when it is smaller than the raw bytes, so a reader refuses anything larger unread."""
    return HEADER_SIZE + size


def header(codec: int, size: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, codec, 0, size)


def parse_header(head: bytes) -> tuple[int, int]:
    """(codec, raw size) of an envelope header; BlobCorrupt if it is not one."""
    if len(head) < HEADER_SIZE:
        raise BlobCorrupt("blob shorter than its envelope header")
    magic, version, codec, _, size = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise BlobCorrupt("not a cafs blob (bad magic)")
    if version != VERSION or codec not in (CODEC_RAW, CODEC_ZSTD):
        raise BlobCorrupt(f"unsupported blob envelope version {version} codec {codec}")
    if size > MAX_SIZE:
        raise BlobCorrupt(f"blob envelope declares {size} bytes, over the {MAX_SIZE} limit")
    return codec, size


def open_stream(pieces: Iterator[bytes]) -> tuple[int, int, Iterator[bytes]]:
    """(codec, raw size, the payload's pieces) of an envelope arriving in pieces."""
    head = b""
    for piece in pieces:
        head += piece
        if len(head) >= HEADER_SIZE:
            break
    codec, size = parse_header(head)
    return codec, size, itertools.chain((head[HEADER_SIZE:],), pieces)


def decode(envelope: bytes, key_digest: str | None = None, *, size: int | None = None,
           most: int | None = None) -> bytes | memoryview:
    """Unwrap and, given the expected digest, verify. Raises BlobCorrupt on any mismatch.

    Given the blob's `size` (or the `most` it may be), an envelope declaring another is
    refused before anything is decompressed: a few kB of zstd can declare 4 GiB of zeros,
    and the digest is checked only after.

    A raw blob comes back as a view into `envelope` (no copy of a 4 MiB chunk per fetch)."""
    codec, declared = parse_header(envelope)
    if (size is not None and declared != size) or (most is not None and declared > most):
        raise BlobCorrupt(f"blob envelope declares {declared} bytes, expected "
                          f"{size if size is not None else f'at most {most}'}")
    size = declared
    payload = memoryview(envelope)[HEADER_SIZE:]
    raw: bytes | memoryview
    if codec == CODEC_ZSTD:
        try:
            raw = _decompress(payload, size)
        except zstandard.ZstdError as exc:
            raise BlobCorrupt(f"zstd payload damaged: {exc}") from exc
    else:
        raw = payload
    if len(raw) != size:
        raise BlobCorrupt(f"blob size {len(raw)} does not match its header {size}")
    if key_digest is not None and digest(raw) != key_digest:
        raise BlobCorrupt(f"blob content does not match its key {key_digest}")
    return raw


def _decompress(payload: memoryview, size: int) -> bytes:
    """The frame's bytes, never allocating more than it really holds or the header says.

    A frame that states its content size must state the header's; one that does not is
    streamed, stopping one byte past the header's size (zstandard's one-shot decompress
    would allocate the header's whole size up front: a flipped bit asked for 2**40 bytes)."""
    declared = zstandard.get_frame_parameters(payload).content_size
    if declared != zstandard.CONTENTSIZE_UNKNOWN:
        if declared != size:
            raise BlobCorrupt(f"zstd frame holds {declared} bytes, its header says {size}")
        return zstandard.ZstdDecompressor().decompress(payload)
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
        while len(out) <= size:
            piece = reader.read(min(_STREAM_PIECE, size + 1 - len(out)))
            if not piece:
                break
            out += piece
    return bytes(out)
