"""The snapshotter's state: one sqlite database under the root, the single source of truth.

A snapshot's directory is named by its integer id, never by its key (containerd's keys hold
'/' and spaces), and ids are never reused (AUTOINCREMENT), so a directory left behind by a
crash can never be mistaken for a newer snapshot's. Everything a restart needs to remount a
remote snapshot (chain id, labels) lives in the row.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA_V1 = """
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL DEFAULT '',
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    remote INTEGER NOT NULL DEFAULT 0,
    chain_id TEXT,
    usage_size INTEGER NOT NULL DEFAULT 0,
    usage_inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX snapshots_parent ON snapshots(parent);
CREATE INDEX snapshots_chain ON snapshots(chain_id) WHERE chain_id IS NOT NULL;
"""

_COLUMNS = (
    "id, key, parent, kind, labels, created_ns, updated_ns, remote, chain_id, "
    "usage_size, usage_inodes"
)


class Kind(enum.IntEnum):
    """Same numbers as containerd's snapshots.v1.Kind, so they cross the wire unchanged."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class Snapshot:
    id: int
    key: str
    parent: str
    kind: Kind
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    remote: bool = False
    chain_id: str | None = None
    usage_size: int = 0
    usage_inodes: int = 0


def clean_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """containerd drops empty label values on write; an empty value means 'unset'."""
    return {k: v for k, v in labels.items() if v != ""}


def _row(row: tuple[Any, ...]) -> Snapshot:
    return Snapshot(
        id=row[0],
        key=row[1],
        parent=row[2],
        kind=Kind(row[3]),
        labels=json.loads(row[4]),
        created_ns=row[5],
        updated_ns=row[6],
        remote=bool(row[7]),
        chain_id=row[8],
        usage_size=row[9],
        usage_inodes=row[10],
    )


class MetaStore:
    """Thread-safe: one connection behind a re-entrant lock; `transaction()` nests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise RuntimeError(
                f"{path} is not a usable cafs snapshotter database ({exc}); "
                "move it aside to start with empty state") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        with self.transaction():
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                # executescript() would commit mid-transaction; run statement by statement.
                for stmt in filter(None, (s.strip() for s in _SCHEMA_V1.split(";"))):
                    self._db.execute(stmt)
                self._db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {row[0]}; this cafs understands "
                    f"up to {SCHEMA_VERSION}: upgrade cafs"
                )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All reads and writes inside see one consistent state and commit together."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Snapshot]:
        with self._lock:
            return [_row(r) for r in self._db.execute(sql, args).fetchall()]

    def get(self, key: str) -> Snapshot | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,))
        return rows[0] if rows else None

    def get_id(self, snapshot_id: int) -> Snapshot | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,))
        return rows[0] if rows else None

    def all(self) -> list[Snapshot]:
        return self._query(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id")

    def ids(self) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def census(self) -> dict[tuple[Kind, bool], int]:
        """How many snapshots of each (kind, remote): one GROUP BY, no rows decoded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, remote, COUNT(*) FROM snapshots GROUP BY kind, remote")
            return {(Kind(kind), bool(remote)): n for kind, remote, n in rows}

    def remote_ids(self) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM snapshots WHERE remote = 1")]

    def children(self, key: str) -> list[Snapshot]:
        return self._query(f"SELECT {_COLUMNS} FROM snapshots WHERE parent = ?", (key,))

    def has_children(self, key: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (key,))
            return row.fetchone() is not None

    def find_remote(self, chain_id: str, parent: str) -> Snapshot | None:
        rows = self._query(
            f"SELECT {_COLUMNS} FROM snapshots WHERE remote = 1 AND chain_id = ? AND parent = ?",
            (chain_id, parent),
        )
        return rows[0] if rows else None

    def insert(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: Mapping[str, str],
        *,
        remote: bool = False,
        chain_id: str | None = None,
    ) -> Snapshot:
        now = time.time_ns()
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO snapshots (key, parent, kind, labels, created_ns, updated_ns, "
                "remote, chain_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, parent, int(kind), _dump(labels), now, now, int(remote), chain_id),
            )
            snapshot_id = cur.lastrowid
        assert snapshot_id is not None
        found = self.get_id(snapshot_id)
        assert found is not None
        return found

    def commit(
        self, snapshot_id: int, name: str, labels: Mapping[str, str], usage: tuple[int, int]
    ) -> None:
        """An active snapshot becomes committed under a new name, keeping its id and files."""
        now = time.time_ns()
        with self.transaction():
            self._db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, "
                "updated_ns = ?, usage_size = ?, usage_inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), _dump(labels), now, now, *usage, snapshot_id),
            )

    def set_labels(self, snapshot_id: int, labels: Mapping[str, str]) -> None:
        with self.transaction():
            self._db.execute(
                "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                (_dump(labels), time.time_ns(), snapshot_id),
            )

    def delete(self, snapshot_id: int) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))


def _dump(labels: Mapping[str, str]) -> str:
    return json.dumps(clean_labels(labels), sort_keys=True)
