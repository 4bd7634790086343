"""Tar bytes written by hand, for the hostile headers tarfile refuses to write, and an OCI
layout around raw layer bytes (bench.imagebuild only writes well-formed layers)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

BLOCK = 512


def header(name: bytes, size: int, kind: bytes, extra: dict[int, bytes] | None = None) -> bytes:
    """One ustar header block with a valid checksum; `extra` puts bytes at given offsets
    (the old GNU sparse fields live in the prefix area)."""
    head = bytearray(BLOCK)
    head[0 : len(name)] = name
    head[100:108] = b"0000644\0"
    head[108:116] = head[116:124] = b"0000000\0"
    head[124:136] = b"%011o\0" % size
    head[136:148] = b"%011o\0" % 1_700_000_000
    head[156:157] = kind
    head[257:265] = b"ustar\x0000"
    for offset, data in (extra or {}).items():
        head[offset : offset + len(data)] = data
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax_record(key: str, value: bytes) -> bytes:
    """'LEN key=value\\n', where LEN counts its own digits too."""
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def record_of_size(key: str, size: int) -> bytes:
    """A PAX record exactly `size` bytes long (value of 'v's)."""
    start = size - len(key) - 3 - len(str(size))
    for value_len in range(start - 2, start + 2):
        rec = pax_record(key, b"v" * value_len)
        if len(rec) == size:
            return rec
    raise AssertionError(f"no record of {size} bytes")


def special(kind: bytes, body: bytes, name: bytes = b"././@PaxHeader") -> bytes:
    """A special header (PAX 'x'/'g', GNU 'L'/'K') with its body."""
    return header(name, len(body), kind) + pad(body)


def member(name: bytes, data: bytes) -> bytes:
    return header(name, len(data), tarfile.REGTYPE) + pad(data)


def end() -> bytes:
    return bytes(2 * BLOCK)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def raw_layout(layout: Path, tag: str, tars: list[bytes]) -> None:
    """An OCI layout whose layers are these tar bytes, gzipped, with correct digests."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict[str, object]:
        (blobs / _sha(data)[7:]).write_bytes(data)
        return {"digest": _sha(data), "size": len(data)}

    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [_sha(t) for t in tars]}}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **put(json.dumps(config).encode())},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    **put(gzip.compress(t, mtime=0))} for t in tars],
    }
    desc = {"mediaType": manifest["mediaType"], **put(json.dumps(manifest).encode()),
            "annotations": {"org.opencontainers.image.ref.name": tag}}
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))


class Endless(io.RawIOBase):
    """`head`, then zeros for ever; counts what was read, to show a bound held."""

    def __init__(self, head: bytes, filler: bytes = b"\0") -> None:
        self.head = head
        self.filler = filler
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(buf)
        if self.count < len(self.head):
            chunk = self.head[self.count : self.count + n]
        else:
            chunk = (self.filler * (n // len(self.filler) + 1))[:n]
        buf[: len(chunk)] = chunk
        self.count += len(chunk)
        return len(chunk)
