"""Model weight files, recognised while indexing, described in the index meta.

A model server cold start is dominated by reading weight files start to end. Knowing at
mount time which files are weights lets the mount fetch them ahead of any read, in the
order a loader reads them. A safetensors header is taken from the first chunk(s) as they
stream past `LayerApplier._content`, so indexing reads nothing twice, and checked; the
index keeps only what a mount needs of it (its length and tensor count), not the tensor
table, which the loader reads from the file anyway: a header may list millions of tensors,
and every mount parses the index meta (indexer/budgets.py bounds the header read).

Anything odd (a truncated header, a `.bin` that is not a checkpoint) makes a file "not a
weight file", never an indexing failure: a weights description is a hint, and a loader
re-reads and checks the real header anyway.
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Any

from indexer.tree import Node, walk

SCHEMA = 2  # 1 also listed each safetensors file's tensor table and __metadata__
# safetensors' own limit on the JSON header (the Rust crate refuses larger ones).
MAX_SAFETENSORS_HEADER = 100 << 20
GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6: a zip archive
PICKLE_MAGIC = b"\x80"  # legacy torch.save: a pickle, protocol >= 2
FORMATS = {
    b".safetensors": "safetensors",
    b".gguf": "gguf",
    b".onnx": "onnx",
    b".bin": "pytorch",
    b".pt": "pytorch",
    b".pth": "pytorch",
    b".ckpt": "pytorch",
    b".h5": "keras",
    b".msgpack": "flax",
    b".tflite": "tflite",
}
DTYPE_SIZES = {
    "F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E8M0": 1,
}


def format_of(name: bytes) -> str | None:
    """The weight format a file name says, if any (the content still has to agree)."""
    dot = name.rfind(b".")
    return FORMATS.get(name[dot:].lower()) if dot > 0 else None


def parse_safetensors_header(header: bytes, data_size: int) -> list[dict[str, Any]]:
    """The tensor table, sorted by data offset; ValueError if it is not a valid header.

    `data_size` is the size of the byte buffer after the header: every tensor must lie
    inside it and have exactly the bytes its dtype and shape need.
    """
    obj = json.loads(header)
    if not isinstance(obj, dict):
        raise ValueError("safetensors header is not a JSON object")
    tensors = []
    for name, info in obj.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        begin, end = int(offsets[0]), int(offsets[1])
        count = 1
        for dim in shape:
            if not isinstance(dim, int) or dim < 0:
                raise ValueError(f"tensor {name!r} has a bad shape {shape!r}")
            count *= dim
        if dtype not in DTYPE_SIZES or not 0 <= begin <= end <= data_size:
            raise ValueError(f"tensor {name!r}: bad dtype {dtype!r} or offsets {offsets!r}")
        if end - begin != count * DTYPE_SIZES[dtype]:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {shape!r}")
        tensors.append({"name": name, "dtype": dtype, "shape": list(shape),
                        "data_offsets": [begin, end]})
    tensors.sort(key=lambda t: (t["data_offsets"][0], t["data_offsets"][1], t["name"]))
    return tensors


log = logging.getLogger(__name__)


def safetensors_metadata(header: bytes) -> dict[str, str]:
    meta = json.loads(header).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


class WeightProbe:
    """Collects the first bytes of a file as its chunks stream past, then describes it."""

    def __init__(self, fmt: str, size: int, max_header: int = MAX_SAFETENSORS_HEADER,
                 name: bytes = b"") -> None:
        self.fmt = fmt
        self.size = size
        self.max_header = min(max_header, MAX_SAFETENSORS_HEADER)
        self.name = name
        self.need = min(size, 8 if fmt in ("safetensors", "gguf") else 4)
        self._head = bytearray()
        self._seen = 0  # file bytes fed so far

    @property
    def wants_more(self) -> bool:
        return len(self._head) < self.need

    def feed(self, data: bytes) -> None:
        """`data` is the file's next bytes (callers feed chunks in order)."""
        start = self._seen
        self._seen += len(data)
        self._take(data, start)
        if self.fmt == "safetensors" and self.need == 8 and len(self._head) == 8:
            (n,) = struct.unpack_from("<Q", self._head)
            if 0 < n <= self.max_header and 8 + n <= self.size:
                self.need = 8 + n
                self._take(data, start)
            elif self.max_header < n <= MAX_SAFETENSORS_HEADER and 8 + n <= self.size:
                log.warning("%r is not described as weights: its safetensors header of %d "
                            "bytes is over the max_weights_header budget of %d (raise it "
                            "with `cafs index --max-weights-header N`)", self.name, n,
                            self.max_header)

    def _take(self, data: bytes, start: int) -> None:
        lo, hi = len(self._head) - start, self.need - start
        if hi > lo and lo < len(data):
            self._head += data[lo:hi]

    def result(self) -> dict[str, Any] | None:
        """What goes into the index meta for this file, or None if it is no weight file."""
        head = bytes(self._head)
        if len(head) < self.need:
            return None
        if self.fmt == "safetensors":
            return self._safetensors(head)
        if self.fmt == "gguf":
            if not head.startswith(GGUF_MAGIC):
                return None
            return {"format": "gguf", "size": self.size,
                    "version": struct.unpack_from("<I", head, 4)[0]}
        if self.fmt == "pytorch" and not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
            return None
        return {"format": self.fmt, "size": self.size}

    def _safetensors(self, head: bytes) -> dict[str, Any] | None:
        if len(head) < 8:
            return None
        header = head[8:]
        try:
            tensors = parse_safetensors_header(header, self.size - len(head))
            safetensors_metadata(header)
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            return None
        return {"format": "safetensors", "size": self.size, "header_len": len(header),
                "tensors": len(tensors)}


def probe(name: bytes, size: int, max_header: int = MAX_SAFETENSORS_HEADER
          ) -> WeightProbe | None:
    """A probe for a regular file that may be a weight file, from its tar member name;
    safetensors headers over `max_header` bytes are not read (the file is not described)."""
    fmt = format_of(name.rsplit(b"/", 1)[-1])
    if fmt is None or size <= 0:
        return None
    return WeightProbe(fmt, size, max_header, name)


def describe(root: Node) -> dict[str, Any] | None:
    """The index meta's `weights` value: every weight file by path, sorted by path.

    Paths that are not UTF-8 are left out (JSON cannot carry them faithfully); hard links
    are listed once, under their first path.
    """
    files: list[dict[str, Any]] = []
    seen: set[int] = set()
    for path, node in walk(root):
        if node.weights is None or id(node) in seen:
            continue
        seen.add(id(node))
        try:
            text = path.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append({"path": text, **node.weights})
    if not files:
        return None
    files.sort(key=lambda f: f["path"].encode())
    return {"schema": SCHEMA, "files": files}
