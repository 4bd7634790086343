"""Startup profiles: which blobs a workload reads at start, in order, kept beside its index.

Only a recorded run knows an image's real working set (a few percent of its bytes, Slacker
found), so a mount records the first read of every (file, chunk) while the workload starts,
and a later cold start replays that list at high parallelism before the workload asks.
A profile lives under `profiles/<index>/<name>` and never touches the index: the index and
its digest stay the same whether or not an image was ever profiled.

A startup pack concatenates the profiled blobs' envelopes, as stored, in access order, so a
replay can fetch them with a few large range GETs; each blob is still decoded and verified
against its own key, exactly as when fetched alone.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from blobstore import BlobCorrupt, BlobNotFound, BlobStore, blob_key, records
from blobstore.base import PROFILE_PREFIX
from blobstore.envelope import HEADER_SIZE, MAX_SIZE, digest
from indexer.format import Index

SCHEMA = 1
DEFAULT_NAME = "default"
PACK_PREFIX = "packs/"
PACK_MAX = 1 << 30  # a pack is built in memory: profiled bytes past this are left out
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PACK_KEY = re.compile(PACK_PREFIX + "[0-9a-f]{64}")
# Bounds a stored profile must keep (docs/FORMAT.md): one entry is ~150 bytes of JSON, so
# a profile of a million first reads is ~150 MiB.
MAX_PROFILE_BYTES = 256 << 20
MAX_ENTRIES = 1 << 20
MAX_PATH = 4096
# An envelope as stored: the header, then at most the decoded size's zstd bound.
MAX_ENVELOPE = HEADER_SIZE + MAX_SIZE + (MAX_SIZE >> 7) + 4096


class ProfileError(ValueError):
    """A bad profile name, or a stored profile this version cannot read."""


@dataclass
class ProfileEntry:
    blob: str  # BLAKE3 key of the chunk read
    size: int  # its decoded size
    t_ms: float  # first read, milliseconds after recording started
    path: str  # the file it belongs to (for people; replay needs only blob and size)
    chunk: int  # chunk number inside that file


@dataclass
class PackTable:
    key: str  # packs/<BLAKE3 of the pack object>
    size: int
    blobs: list[list[Any]]  # [blob key, offset, envelope length], in pack order


@dataclass
class Profile:
    index: str
    name: str
    chunk_size: int
    entries: list[ProfileEntry]
    duration_ms: float = 0.0
    created: float = field(default_factory=time.time)
    pack: PackTable | None = None
    schema: int = SCHEMA

    def blobs(self) -> list[tuple[str, int]]:
        """(key, size) of each distinct blob, in first-read order."""
        seen: set[str] = set()
        out = []
        for e in self.entries:
            if e.blob not in seen:
                seen.add(e.blob)
                out.append((e.blob, e.size))
        return out

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.blobs())

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Profile:
        """The profile in `data`, every field checked against its type and bounds
        (docs/FORMAT.md); ProfileError, and nothing else, if any is off."""
        try:
            f = records.parse(data)
            if f.obj.get("schema") != SCHEMA:
                raise ProfileError("unsupported profile schema "
                                   f"{records.short(f.obj.get('schema'))}")
            chunk_size = f.integer("chunk_size", 1, MAX_SIZE)
            entries = [_entry(records.Fields(e, "entry"), chunk_size)
                       for e in f.items("entries", MAX_ENTRIES)]
            return cls(f.text("index", 64, records.HEX64), check_name(f.text("name", 64)),
                       chunk_size, entries, f.number("duration_ms", 0.0),
                       f.number("created", 0.0),
                       _pack(f.sub("pack")) if f.has("pack") else None)
        except records.RecordError as exc:
            raise ProfileError(f"unreadable profile: {exc}") from None


def _entry(f: records.Fields, chunk_size: int) -> ProfileEntry:
    return ProfileEntry(f.text("blob", 64, records.HEX64), f.integer("size", 0, chunk_size),
                        f.number("t_ms"), f.text("path", MAX_PATH),
                        f.integer("chunk", 0, MAX_SIZE))


def _pack(f: records.Fields) -> PackTable:
    """A pack table whose runs lie in the pack, in order, each one envelope long at most:
    a replay fetches ranges of it as they say."""
    size = f.integer("size", 0, PACK_MAX)
    table: list[list[Any]] = []
    end = 0
    for n, row in enumerate(f.items("blobs", MAX_ENTRIES)):
        if not isinstance(row, list) or len(row) != 3:
            raise records.RecordError(f"pack.blobs[{n}] is not [key, offset, length]")
        key = records.check_str(row[0], 64, records.HEX64, f"pack.blobs[{n}] key")
        offset = records.check_int(row[1], end, size, f"pack.blobs[{n}] offset")
        length = records.check_int(row[2], HEADER_SIZE, min(size - offset, MAX_ENVELOPE),
                                   f"pack.blobs[{n}] length")
        end = offset + length
        table.append([key, offset, length])
    return PackTable(f.text("key", 70, _PACK_KEY), size, table)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ProfileError(f"bad profile name {name!r}: letters, digits, '.', '_', '-' "
                           "(up to 64, not starting with a punctuation mark)")
    return name


def profile_key(index: str, name: str) -> str:
    return f"{PROFILE_PREFIX}{index}/{check_name(name)}"


def save_profile(store: BlobStore, profile: Profile) -> str:
    key = profile_key(profile.index, profile.name)
    store.put(key, profile.to_json())
    return key


def load_profile(store: BlobStore, index: str, name: str = DEFAULT_NAME) -> Profile | None:
    """The stored profile, or None if this image has none by that name."""
    key = profile_key(index, name)
    try:
        profile = Profile.from_json(records.read(store, key, MAX_PROFILE_BYTES))
    except BlobNotFound:
        return None
    except BlobCorrupt as exc:
        raise ProfileError(f"unreadable profile: {exc}") from None
    if (profile.index, profile.name) != (index, name):
        raise ProfileError(f"{key} holds the profile {profile.name!r} of {profile.index}")
    return profile


def list_profiles(store: BlobStore, index: str) -> list[str]:
    prefix = f"{PROFILE_PREFIX}{index}/"
    return sorted(key[len(prefix) :] for key in store.list(prefix))


def delete_profile(store: BlobStore, index: str, name: str) -> None:
    store.delete(profile_key(index, name))


def build_pack(store: BlobStore, profile: Profile, max_bytes: int = PACK_MAX) -> Profile:
    """Write the startup pack of a profile and return the profile with its table.

    The envelopes are copied as stored (no re-encoding), so a pack holds exactly the
    bytes per-blob GETs would have returned. Packs are content-addressed: rebuilding the
    same profile writes nothing new.
    """
    parts: list[bytes] = []
    table: list[list[Any]] = []
    offset = 0
    for key, _size in profile.blobs():
        envelope = store.get(blob_key(key))
        if offset + len(envelope) > max_bytes:
            break
        table.append([key, offset, len(envelope)])
        parts.append(envelope)
        offset += len(envelope)
    data = b"".join(parts)
    pack_key = PACK_PREFIX + digest(data)
    if not store.exists(pack_key):
        store.put(pack_key, data)
    profile.pack = PackTable(pack_key, len(data), table)
    return profile


class Recorder:
    """Notes the first read of every (inode, chunk) of a mount, in order, with its time.

    Called from the FUSE read path, so it only appends; paths are looked up once, when the
    profile is taken.
    """

    def __init__(self, index: Index, index_key: str, name: str) -> None:
        self.index = index
        self.index_key = index_key
        self.name = check_name(name)
        self.started = time.monotonic()
        self.active = True
        self._seen: set[tuple[int, int]] = set()
        self._reads: list[tuple[int, int, int, float]] = []  # ino, chunk, size, t

    def on_read(self, ino: int, chunk: int, size: int) -> None:
        if not self.active or (ino, chunk) in self._seen:
            return
        self._seen.add((ino, chunk))
        self._reads.append((ino, chunk, size, time.monotonic()))

    def __len__(self) -> int:
        return len(self._reads)

    def profile(self) -> Profile:
        paths = self._paths({ino for ino, _, _, _ in self._reads})
        entries = []
        chunks: dict[int, list[str]] = {}
        for ino, chunk, size, t in self._reads:
            keys = chunks.get(ino)
            if keys is None:
                keys = chunks[ino] = self.index.chunks(ino)
            entries.append(ProfileEntry(keys[chunk], size, round(1000 * (t - self.started), 3),
                                        paths.get(ino, ""), chunk))
        duration = 1000 * (time.monotonic() - self.started)
        return Profile(self.index_key, self.name, self.index.max_chunk_size, entries,
                       round(duration, 3))

    def _paths(self, wanted: set[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        if not wanted:
            return out
        for path, node in self.index.walk():
            if node.ino in wanted and node.ino not in out:
                out[node.ino] = path.decode("utf-8", "surrogateescape")
                if len(out) == len(wanted):
                    break
        return out
