"""The snapshotter's sqlite state: refuses what it cannot read, clearly, and keeps it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from snapshotter.metastore import SCHEMA_VERSION, MetaStore


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "metadata.db"
    MetaStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    before = db.read_bytes()
    with pytest.raises(RuntimeError, match="upgrade cafs"):
        MetaStore(db)
    assert db.read_bytes() == before


def test_a_damaged_file_is_explained(tmp_path: Path) -> None:
    db = tmp_path / "metadata.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RuntimeError, match="not a usable cafs snapshotter database"):
        MetaStore(db)
    assert db.read_bytes() == b"this is not sqlite" * 100


def test_reopening_keeps_state(tmp_path: Path) -> None:
    db = tmp_path / "metadata.db"
    MetaStore(db).close()
    MetaStore(db).close()  # the schema is created once, then found
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)]
