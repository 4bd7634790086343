"""Neighbour packs: an image's small files, packed in tree order, so a cold read brings its
directory's siblings in one ranged GET.

Without a profile a lazily loaded image is request-bound: an interpreter importing a package
reads its files one after another, each a miss that pays the link's round trip. What a
process reads next is most often beside what it read last (the same directory: a package's
modules, its `__pycache__`), so `cafs index` also writes the envelopes of the image's small
blobs, as stored, concatenated in inode order (breadth first, entries by name: a
directory's files are contiguous) into one object `packs/<BLAKE3>`, and the image's top
index names it with its table in the meta (`neighbours`, docs/FORMAT.md). Every blob stays
its own object under `blobs/` (dedup, per-blob fetches, old nodes); a reader decodes and
verifies each envelope of a segment against its own key, exactly as if fetched alone.

The table is a list of 12-byte records `(inode, directory inode, envelope length)` in pack
order; offsets are the running sum of the lengths. It names inodes, not keys, to stay small;
a reader finds each inode's key in the index it already verified.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from blobstore.envelope import HEADER_SIZE, digest, encode
from indexer.format import ROOT_INO, Index, IndexFormatError

VERSION = 1
META_KEY = "neighbours"
PACK_PREFIX = "packs/"
MAX_BLOB = 256 << 10  # files up to this size travel in the pack
MAX_PACK = 512 << 20  # the pack is built in memory: small files past this are left out
MAX_SIBLINGS = 64  # sibling directories a first miss looks at for its fetch ahead
SCAN_MAX = 4096  # entries of a directory and its parent read to tell whether it is a package
RECORD = struct.Struct("<III")  # inode, directory inode, envelope length
# The pack's envelopes are what a cold start without a profile fetches and mostly does not
# read (a directory's run around each miss): zstd 6 made #20's 5.0 MB of segments 6% smaller
# than the blobs' level 3, for 3x the CPU on small files only (docs/ARCHITECTURE.md).
LEVEL = 6


class NeighbourTableError(ValueError):
    """An index's neighbour record is malformed: the mount fetches blob by blob."""


class Member(NamedTuple):
    """One blob of the pack: where its envelope is, and the file it is. (A tuple: a mount
    decodes thousands of them before its first miss can use the pack.)"""

    ino: int
    group: int  # the directory holding it: a segment never leaves it
    offset: int
    length: int


def members(index: Index, max_blob: int = MAX_BLOB) -> Iterator[tuple[int, int, str]]:
    """(inode, directory inode, blob key) of every small one-chunk file, each blob once, in
    inode order: directories in breadth-first order, each one's entries by name."""
    seen: set[str] = set()
    for dir_ino in range(ROOT_INO, index.inode_count + 1):
        if not index.inode(dir_ino).is_dir:
            continue
        for _, _, child in index.entries(dir_ino):
            node = index.inode(child)
            if not node.is_reg or node.count != 1 or not 0 < node.size <= max_blob:
                continue
            key = index.chunks(child)[0]
            if key not in seen:
                seen.add(key)
                yield child, dir_ino, key


def build(index: Index, small: Mapping[str, bytes], compress: bool = True,
          max_blob: int = MAX_BLOB, max_pack: int = MAX_PACK, workers: int = 8
          ) -> tuple[bytes, dict[str, Any]] | None:
    """The pack of `index`'s small files whose bytes `small` holds (keyed by blob), and the
    record that names it (None when there are none). Deterministic: the same tree and the
    same bytes give the same pack, so re-indexing writes nothing new."""
    wanted = [(ino, group, key) for ino, group, key in members(index, max_blob) if key in small]
    if not wanted:
        return None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pack") as pool:
        envelopes = list(pool.map(lambda m: encode(small[m[2]], compress, LEVEL), wanted))
    parts: list[bytes] = []
    table = bytearray()
    size = 0
    for (ino, group, _key), envelope in zip(wanted, envelopes, strict=True):
        if size + len(envelope) > max_pack:
            break
        parts.append(envelope)
        table += RECORD.pack(ino, group, len(envelope))
        size += len(envelope)
    data = b"".join(parts)
    record = {"version": VERSION, "pack": digest(data), "size": size,
              "table": base64.b64encode(bytes(table)).decode()}
    return data, {META_KEY: record}


def pack_key(pack: str) -> str:
    return PACK_PREFIX + pack


def stored_pack(index: Index) -> str | None:
    """The store key of the index's neighbour pack, if its meta names one (for gc)."""
    record = index.meta.get(META_KEY)
    if isinstance(record, dict) and isinstance(record.get("pack"), str):
        pack = record["pack"]
        if len(pack) == 64 and all(c in "0123456789abcdef" for c in pack):
            return pack_key(pack)
    return None


class NeighbourTable:
    """A decoded, checked neighbour record: which inode's envelope is where in the pack."""

    def __init__(self, index: Index, record: Any) -> None:
        pack, size, raw = _fields(record)
        if len(raw) % RECORD.size:
            raise NeighbourTableError(f"table of {len(raw)} bytes is not whole records")
        self.key = pack_key(pack)
        self.size = size
        self.members: list[Member] = []
        self.position: dict[int, int] = {}  # inode -> its place in `members`
        self.inodes: dict[str, int] = {}  # blob key -> a member's inode (the last of a key)
        offset = 0
        for ino, group, length in RECORD.iter_unpack(raw):
            if not 1 <= ino <= index.inode_count or not 1 <= group <= index.inode_count:
                raise NeighbourTableError(f"inode {ino} or directory {group} is not in the index")
            if length <= HEADER_SIZE or ino in self.position:
                raise NeighbourTableError(f"inode {ino}: bad or repeated entry")
            key = index.single_chunk(ino)
            if key is None:
                raise NeighbourTableError(f"inode {ino} is not a file of one chunk")
            self.position[ino] = len(self.members)
            self.members.append(Member(ino, group, offset, length))
            self.inodes[key] = ino
            offset += length
        if offset != size:
            raise NeighbourTableError(f"table covers {offset} bytes, the pack has {size}")
        self._runs = _runs(self.members)
        self._run_list = list(dict.fromkeys(self._runs))  # each directory's run, pack order
        self._index = index
        self._kinds: dict[int, set[bytes]] = {}  # directory -> extensions of its members
        try:
            self._families, self._parents = _families(index, self.members, self._run_list)
        except IndexFormatError as exc:
            raise NeighbourTableError(f"the index's tree: {exc}") from None

    def segment(self, ino: int, cap: int, wanted: Callable[[int], bool]) -> list[Member]:
        """The members to fetch with `ino`: its directory's run of the pack, at most `cap`
        bytes around it (forward first: importers often go on in name order), trimmed of
        members `wanted` says are not (here already) at either end. Empty when `ino` is not
        in the pack."""
        pos = self.position.get(ino)
        if pos is None:
            return []
        start, end = self._runs[pos]
        lo, hi, used = pos, pos + 1, self.members[pos].length
        while hi < end and used + self.members[hi].length <= cap:
            used += self.members[hi].length
            hi += 1
        while lo > start and used + self.members[lo - 1].length <= cap:
            lo -= 1
            used += self.members[lo].length
        while lo < pos and not wanted(self.members[lo].ino):
            lo += 1
        while hi > pos + 1 and not wanted(self.members[hi - 1].ino):
            hi -= 1
        return self.members[lo:hi]

    def ahead(self, ino: int, cap: int, segment_cap: int,
              wanted: Callable[[int], bool]) -> list[list[Member]]:
        """What to fetch ahead of `ino`'s first miss in its directory: the rest of the
        directory's run, forward from `ino` then back, then the runs of its sibling
        directories (the same parent: a package's other modules; `_in_a_package`), nearest
        first; only the `wanted` members, at most `cap` bytes in all, as contiguous
        segments of at most `segment_cap` bytes each (one ranged GET apiece; neighbouring
        runs share one)."""
        pos = self.position.get(ino)
        if pos is None or cap <= 0:
            return []
        start, end = self._runs[pos]
        order = [*range(pos + 1, end), *range(pos - 1, start - 1, -1)]
        group = self.members[pos].group
        if self._in_a_package(ino, group):
            for run_start, run_end in self._sibling_runs(group):
                order.extend(range(run_start, run_end))
        chosen: list[int] = []
        used = 0
        for i in order:
            length = self.members[i].length
            if used + length > cap:
                break
            if wanted(self.members[i].ino):
                chosen.append(i)
                used += length
        segments: list[list[Member]] = []
        for i in sorted(chosen):
            last = segments[-1] if segments else None
            if (last is not None and self.position[last[-1].ino] == i - 1
                    and last[-1].offset + last[-1].length - last[0].offset
                    + self.members[i].length <= segment_cap):
                last.append(self.members[i])
            else:
                segments.append([self.members[i]])
        return segments

    def spans(self, positions: Sequence[int], gap: int, cap: int) -> list[list[Member]]:
        """The members at `positions` (places in the pack, ascending) as contiguous segments:
        one goes on past a member while the next wanted one starts within `gap` bytes of its
        end and the segment stays within `cap` bytes (the members between come along)."""
        segments: list[list[Member]] = []
        first = last = -1
        for pos in positions:
            member = self.members[pos]
            if segments and member.offset - (self.members[last].offset
                                              + self.members[last].length) <= gap \
                    and member.offset + member.length - self.members[first].offset <= cap:
                segments[-1].extend(self.members[last + 1 : pos + 1])
            else:
                segments.append([member])
                first = pos
            last = pos
        return segments

    def _in_a_package(self, ino: int, group: int) -> bool:
        """Whether `group`'s sibling directories are its family for a first miss on `ino`:
        their parent holds, in the pack, a file of `ino`'s kind (its name's extension). A
        package's subpackages sit beside its modules (numpy's, the stdlib's), so they are
        read together; a parent of other trees (`usr/lib`: `python3.11` beside
        `x86_64-linux-gnu`, `valgrind`, ...) holds none, or not of that kind: fetching its
        directories with a module's miss cost #20's `import numpy` 1.2 MB it never read, for
        no fewer waits (docs/ARCHITECTURE.md). Names are decoded here, on a directory's
        first miss (at most `SCAN_MAX` of them, on the mount's event loop), not for every
        member when the table is read."""
        parent = self._parents.get(group)
        if parent is None or max(self._index.inode(d).count for d in (parent, group)) > SCAN_MAX:
            return False  # a directory this size is a data set, not a package: no scan
        kinds = self._kinds.get(parent)
        if kinds is None:
            kinds = self._kinds[parent] = {_kind(name) for _, name, child
                                           in self._index.entries(parent)
                                           if child in self.position}
        return _kind(_name_in(self._index, group, ino)) in kinds

    def _sibling_runs(self, group: int) -> Iterator[tuple[int, int]]:
        """The runs of `group`'s sibling directories, nearest in the pack first (one
        after, one before, ...), at most `MAX_SIBLINGS` of them."""
        family = self._families.get(group)
        if family is None:
            return
        ranks, place = family
        for step in range(1, MAX_SIBLINGS // 2 + 1):
            for near in (place + step, place - step):
                if 0 <= near < len(ranks):
                    yield self._run_list[ranks[near]]


def load(index: Index) -> NeighbourTable | None:
    """The index's neighbour table; None if it has none (older indexes, lower chains);
    NeighbourTableError if it has a record this version cannot use."""
    record = index.meta.get(META_KEY)
    if record is None:
        return None
    return NeighbourTable(index, record)


def _fields(record: Any) -> tuple[str, int, bytes]:
    if not isinstance(record, dict):
        raise NeighbourTableError("neighbour record is not an object")
    if record.get("version") != VERSION:
        raise NeighbourTableError(f"neighbour record version {record.get('version')!r}; "
                                  f"this cafs reads {VERSION}")
    pack, size, table = record.get("pack"), record.get("size"), record.get("table")
    if not isinstance(pack, str) or len(pack) != 64 or pack.strip("0123456789abcdef"):
        raise NeighbourTableError("neighbour record names no pack")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise NeighbourTableError("neighbour record has no pack size")
    if not isinstance(table, str):
        raise NeighbourTableError("neighbour record has no table")
    try:
        raw = base64.b64decode(table, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NeighbourTableError(f"neighbour table is not base64: {exc}") from None
    return pack, size, raw


def _families(index: Index, members: list[Member], runs: list[tuple[int, int]]
              ) -> tuple[dict[int, tuple[list[int], int]], dict[int, int]]:
    """For each directory with a run in the pack: the pack-order ranks (in `runs`) of its
    parent's directories that have one, and its own place among them; and its parent
    directory. One pass over the index's directories; a directory with several runs (a
    pack not in tree order) counts by its last."""
    rank = {members[start].group: i for i, (start, _) in enumerate(runs)}
    out: dict[int, tuple[list[int], int]] = {}
    parents: dict[int, int] = {}
    for parent, children in index.directories():
        ranks = sorted({rank[c] for c in children if c in rank})
        for place, r in enumerate(ranks):
            group = members[runs[r][0]].group
            out[group] = (ranks, place)
            parents[group] = parent
    return out, parents


def _name_in(index: Index, directory: int, ino: int) -> bytes:
    for _, name, child in index.entries(directory):
        if child == ino:
            return name
    return b""


def _kind(name: bytes) -> bytes:
    """A file name's extension (`py`, `so`, `pyc`), empty for none (`passwd`, `.bashrc`)."""
    stem, dot, ext = name.rpartition(b".")
    return ext if dot and stem else b""


def _runs(members: list[Member]) -> list[tuple[int, int]]:
    """For each member, the [start, end) of the contiguous run of its directory."""
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(members) + 1):
        if i == len(members) or members[i].group != members[start].group:
            out.extend([(start, i)] * (i - start))
            start = i
    return out
