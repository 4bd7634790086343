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

from blobstore import records
from indexer.tree import Node, walk

SCHEMA = 2  # 1 also listed each safetensors file's tensor table and __metadata__
MAX_LISTED = 1 << 20  # weight files in one index, tensors in one file
MAX_PATH = 4096
INT64 = (1 << 63) - 1
# safetensors' own limit on the JSON header (the Rust crate refuses larger ones).
MAX_SAFETENSORS_HEADER = 100 << 20
GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6: a zip archive
# Legacy torch.save (before 1.6): torch's magic number 0x1950a86a20f9469cfc6c pickled with
# protocol 2. A lone 0x80 (any pickle) also began 1 in 256 random `.bin` files, which were
# then chunked and prefetched as weights.
PICKLE_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
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


class BadWeightsMeta(ValueError):
    """An index meta's `weights` that is not what docs/FORMAT.md says."""


def _json(header: bytes) -> Any:
    try:
        return json.loads(header)
    except RecursionError:
        raise ValueError("safetensors header nests too deep") from None


def parse_safetensors_header(header: bytes, data_size: int) -> list[dict[str, Any]]:
    """The tensor table, sorted by data offset; ValueError, and nothing else, if it is not
    a valid header.

    `data_size` is the size of the byte buffer after the header: every tensor must lie
    inside it and have exactly the bytes its dtype and shape need.
    """
    obj = _json(header)
    if not isinstance(obj, dict):
        raise ValueError("safetensors header is not a JSON object")
    tensors = [_tensor(name, info, data_size) for name, info in obj.items()
               if name != "__metadata__"]
    tensors.sort(key=lambda t: (t["data_offsets"][0], t["data_offsets"][1], t["name"]))
    return tensors


def _tensor(name: str, info: Any, data_size: int) -> dict[str, Any]:
    """One tensor's entry, checked: a dtype, a shape of whole numbers, and offsets inside
    the data that hold exactly its bytes."""
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r} is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {name!r}: bad dtype {dtype!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_whole(o) for o in offsets)):
        raise ValueError(f"tensor {name!r}: bad offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise ValueError(f"tensor {name!r}: offsets {offsets!r} outside the data")
    if not isinstance(shape, list):
        raise ValueError(f"tensor {name!r} has a bad shape {shape!r}")
    count = 1
    for dim in shape:
        if not _whole(dim) or dim < 0:
            raise ValueError(f"tensor {name!r} has a bad shape {shape!r}")
        count *= dim
        if count > data_size:  # stop before a product of huge dims gets expensive
            raise ValueError(f"tensor {name!r}: shape {shape!r} is larger than the data")
    if end - begin != count * DTYPE_SIZES[dtype]:
        raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {shape!r}")
    return {"name": name, "dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

log = logging.getLogger(__name__)


def safetensors_metadata(header: bytes) -> dict[str, str]:
    obj = _json(header)
    meta = (obj.get("__metadata__") if isinstance(obj, dict) else None) or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def listed(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The weight files an index's meta lists (none if it has no `weights`), each entry
    checked against docs/FORMAT.md; BadWeightsMeta, and nothing else, if any is off."""
    value = meta.get("weights")
    if value is None:
        return []
    try:
        f = records.Fields(value, "weights")
        schema = f.obj.get("schema")
        if schema not in (1, SCHEMA) or isinstance(schema, bool):
            raise records.RecordError(f"unsupported schema {records.short(schema)}")
        files = f.items("files", MAX_LISTED)
        for n, entry in enumerate(files):
            _listed_file(records.Fields(entry, f"weights.files[{n}]"), schema)
        return files
    except (records.RecordError, ValueError) as exc:
        raise BadWeightsMeta(f"index meta's weights: {exc}") from None


def _listed_file(f: records.Fields, schema: int) -> None:
    """Schema 2 keeps a safetensors file's tensor count; schema 1 (older indexes) kept the
    whole tensor table, each entry checked as a header's would be."""
    f.text("path", MAX_PATH)
    f.text("format", 32)
    size = f.integer("size", 0, INT64)
    if f.has("header_len"):
        f.integer("header_len", 0, MAX_SAFETENSORS_HEADER)
    if f.has("version"):
        f.integer("version", 0, (1 << 32) - 1)
    if f.has("tensors") and schema == SCHEMA:
        f.integer("tensors", 0, MAX_LISTED)
    elif f.has("tensors"):
        for n, tensor in enumerate(f.items("tensors", MAX_LISTED)):
            t = records.Fields(tensor, f"{f.where}.tensors[{n}]")
            _tensor(t.text("name", MAX_PATH), t.obj, size)


class WeightProbe:
    """Collects the first bytes of a file as its chunks stream past, then describes it."""

    def __init__(self, fmt: str, size: int, max_header: int = MAX_SAFETENSORS_HEADER,
                 name: bytes = b"") -> None:
        self.fmt = fmt
        self.size = size
        self.max_header = min(max_header, MAX_SAFETENSORS_HEADER)
        self.name = name
        self.need = min(size, {"safetensors": 8, "gguf": 8, "pytorch": len(PICKLE_MAGIC)}
                        .get(fmt, 4))
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
