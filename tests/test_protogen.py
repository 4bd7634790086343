"""The committed gRPC modules are exactly what `python -m snapshotter.protogen` makes from the
committed protos: a proto edited without regenerating, or a stub edited by hand, fails here."""

from __future__ import annotations

from pathlib import Path

from snapshotter.protogen import API_DIR, generate


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    written = generate(out_dir=tmp_path)
    fresh = {p.name: p.read_bytes() for p in written}
    committed = {p.name: p.read_bytes() for p in API_DIR.glob("*_pb2*.py*")}
    assert sorted(fresh) == sorted(committed)
    differ = [name for name in fresh if fresh[name] != committed[name]]
    assert not differ, f"regenerate with `python -m snapshotter.protogen`: {differ}"
