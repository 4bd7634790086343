"""Configuration layering (defaults < file < env < flags) and `cafs config show`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cafs import config
from cafs.cli.app import build_parser


def _write(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("CAFS_CONFIG", str(path))
    for s in config.SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    return path


def test_layers_and_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, '[store]\nurl = "s3://b/p"\n[cache]\nsize = "2G"\n'
                            '[mount]\nfetch_deadline = 5\n', monkeypatch)
    monkeypatch.setenv("CAFS_FETCH_DEADLINE", "7.5")
    cfg = config.load()
    assert cfg.get("store.url") == "s3://b/p" and cfg.sources["store.url"] == str(path)
    assert cfg.get("cache.size") == 2 << 30
    assert cfg.get("mount.fetch_deadline") == 7.5
    assert cfg.sources["mount.fetch_deadline"] == "env CAFS_FETCH_DEADLINE"
    assert cfg.sources["snapshotter.root"] == "default"
    args = build_parser().parse_args(["mount", "ref", "/mnt", "--store", "file:///x"])
    config.apply(args, cfg)
    assert args.store == "file:///x"  # the flag wins
    assert args.cache_size == 2 << 30  # the file fills what the flag left unset


def test_snapshotter_settings_fill_its_flags(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, '[snapshotter]\nroot = "/srv/sn"\nmetrics_address = "127.0.0.1:1"\n',
           monkeypatch)
    args = build_parser().parse_args(["snapshotter"])
    config.apply(args, config.load())
    assert str(args.root) == "/srv/sn" and args.metrics_address == "127.0.0.1:1"
    pull = build_parser().parse_args(["pull", "x"])
    config.apply(pull, config.load())
    assert pull.address != "/run/cafs/snapshotter.sock"  # pull's --address is containerd's


@pytest.mark.parametrize("text", ['[store]\nurl = "a"\nbogus = 1\n', "not toml ][",
                                  '[cache]\nsize = "lots"\n'])
def test_bad_files_are_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 text: str) -> None:
    _write(tmp_path, text, monkeypatch)
    with pytest.raises(config.ConfigError):
        config.load()


def test_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, '[store]\nurl = "s3://b/p"\n', monkeypatch)
    from cafs.cli.app import main

    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "store.url" in out and "s3://b/p" in out and str(tmp_path) in out
