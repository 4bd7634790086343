"""`cafs run`: a container from an indexed image, via runc, on the lazy mount."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs import paths
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

pytestmark = pytest.mark.root


@pytest.fixture
def busybox_image(tmp_path: Path) -> tuple[str, str]:
    layers = [
        [Entry.from_host("bin/busybox", "/bin/busybox", mode=0o755),
         Entry("bin/sh", "symlink", linkname="busybox"),
         Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n"),
         Entry("etc/group", data=b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n"),
         Entry("app", "dir", uid=1000, gid=1000)],
        [Entry("app/greeting", data=b"hello from cafs\n"), Entry("etc/group", "whiteout"),
         Entry("etc/group", data=b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n")],
    ]
    config = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["cat /app/greeting"],
              "Env": ["GREETING=hi"], "WorkingDir": "/app"}
    build_layout(tmp_path / "l", "t", layers, config=config)
    url = f"file://{tmp_path}/store"
    ref = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(url),
                      IndexOptions()).record.ref
    return url, ref


def _cafs(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cafs", *args, "--cache-dir", str(cache)]
                          if args[0] != "run" else
                          [sys.executable, "-m", "cafs", "run", "--cache-dir", str(cache),
                           *args[1:]], capture_output=True, text=True, timeout=120)


def test_run_prints_the_image_default_command(busybox_image: tuple[str, str],
                                              tmp_path: Path) -> None:
    url, ref = busybox_image
    res = _cafs("run", "--rm", "--stats", "--store", url, ref, cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello from cafs\n"
    assert "fetched on demand" in res.stderr


def test_run_overrides_env_workdir_user_and_exit_status(busybox_image: tuple[str, str],
                                                        tmp_path: Path) -> None:
    url, ref = busybox_image
    script = "echo $GREETING $EXTRA; pwd; id -u; id -g; touch /app/x 2>&1; exit 7"
    res = _cafs("run", "--rm", "-e", "EXTRA=there", "-w", "/etc", "--user", "app:staff",
                "--store", url, ref, "--", script, cache=tmp_path / "c")
    assert res.returncode == 7, res.stderr
    assert res.stdout.splitlines()[:4] == ["hi there", "/etc", "1000", "50"]


def test_run_writes_go_to_a_private_layer(busybox_image: tuple[str, str], tmp_path: Path) -> None:
    url, ref = busybox_image
    first = _cafs("run", "--rm", "--store", url, ref, "--",
                  "echo changed > /app/greeting; cat /app/greeting", cache=tmp_path / "c")
    assert first.stdout == "changed\n", first.stderr
    second = _cafs("run", "--rm", "--store", url, ref, cache=tmp_path / "c")
    assert second.stdout == "hello from cafs\n"
    leftovers = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                 if str(paths.run_dir() / "containers") in line]
    assert leftovers == []


def test_run_bad_input(busybox_image: tuple[str, str], tmp_path: Path) -> None:
    url, ref = busybox_image
    res = _cafs("run", "--rm", "--store", url, "no/such:image", cache=tmp_path / "c")
    assert res.returncode == 1 and "no indexed image" in res.stderr
    res = _cafs("run", "--rm", "--user", "nobody", "--store", url, ref, cache=tmp_path / "c")
    assert res.returncode == 1 and "not found in the image" in res.stderr
    res = _cafs("run", "--rm", "-e", "NOEQUALS", "--store", url, ref, cache=tmp_path / "c")
    assert res.returncode == 1 and "KEY=VALUE" in res.stderr


def test_run_sets_supplementary_groups_from_the_image(busybox_image: tuple[str, str],
                                                      tmp_path: Path) -> None:
    url, ref = busybox_image
    res = _cafs("run", "--rm", "--user", "app", "--store", url, ref, "--", "id -G",
                cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1000", "50"]
