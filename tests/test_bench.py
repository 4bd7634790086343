"""The benchmark suite: a quick run of every scenario produces its JSON, table and plots and
leaves nothing behind, also when interrupted; plus the pure parts (statistics, report, link
parsing) without root. No timing is asserted anywhere: these check the suite, not cafs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from bench import report
from bench.context import Context
from bench.core import SCENARIOS, RunOptions, ScenarioResult, summary
from bench.netshape import Link, delay_proxy, namespace, namespaces, parse_link
from bench.services import free_port, stop_process, wait_http
from bench.workspace import (
    Workspace,
    mounts_under,
    processes_mentioning,
    raise_if_interrupted,
    terminate_raises,
)
from cafs.mounts import mountinfo

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ctrl_c_as_a_user_has_it() -> None:
    """A shell starting a job in the background (`make test &`, nohup) ignores SIGINT for
    it, and Python keeps an ignored SIGINT ignored: give the suite the terminal's default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _bench(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_ctrl_c_as_a_user_has_it,
        **kwargs,  # type: ignore[call-overload]
    )


def _fuse_cafs_mounts() -> set[str]:
    return set(mountinfo.cafs_mountpoints())


def _assert_nothing_left(work: Path, cafs_mounts_before: set[str]) -> None:
    assert list(work.iterdir()) == [], "temp dirs left behind"
    assert mounts_under(work) == []
    assert str(work) not in Path("/proc/self/mountinfo").read_text()
    assert _fuse_cafs_mounts() <= cafs_mounts_before, "cafs mounts left behind"
    assert processes_mentioning(str(work)) == [], "processes left behind"


@pytest.mark.root
@pytest.mark.slow
def test_quick_run_of_every_scenario(tmp_path: Path) -> None:
    import bench.scenarios  # noqa: F401 (registers them)

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    before = _fuse_cafs_mounts()
    proc = _bench("run", "--quick", "--repeat", "1", "--out", str(out), "--workdir", str(work))
    # ~160 s on 2 idle cores (model + pack ~40 s), and ~50 s more for coldstart's stargz
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    _assert_nothing_left(work, before)

    doc = json.loads((out / report.RESULTS_JSON).read_text())
    assert doc["complete"] is True
    for key in ("cpu_model", "cores", "memory_bytes", "kernel", "disk", "date"):
        assert doc["machine"][key], key
    assert {s["name"] for s in doc["scenarios"]} == set(SCENARIOS)
    assert doc["options"]["s3_server"] == "seaweedfs"  # the default S3 server, recorded
    for scenario in doc["scenarios"]:
        assert scenario["error"] is None, scenario["error"]
        assert scenario["goals"], scenario["name"]
        assert any(s["baseline"] for s in scenario["series"]), scenario["name"]
        for series in scenario["series"]:
            assert series["samples"], series["key"]
            assert all(v > 0 for v in series["samples"]), series["key"]
        for ratio in scenario["ratios"]:
            assert ratio["samples"], ratio["label"]
        if SCENARIOS[scenario["name"]].always_s3:
            assert scenario["params"]["store"] == "s3 (seaweedfs)", scenario["name"]
        assert any(raw["series"] for raw in scenario["raw"])

    _assert_model_mounts_as_a_node_does(doc)
    # cafs's bytes are SeaweedFS's own count: the pull's index and EROFS image beside the
    # mount's blobs, as the registry's log counts stargz's manifests and TOCs
    (cold,) = [s for s in doc["scenarios"] if s["name"] == "coldstart"]
    counted = [raw for raw in cold["raw"] if "counted_by" in raw]
    assert counted and all(raw["counted_by"] == "server" and raw["bytes"] > raw["mount_bytes"]
                           for raw in counted), counted

    table = (out / report.REPORT_MD).read_text()
    assert "| measure | contender |" in table
    for name in SCENARIOS:
        assert f"### {name}:" in table
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"]({name}.png)" in table

    (out / report.REPORT_MD).unlink()
    regen = _bench("report", str(out))
    assert regen.wait(timeout=120) == 0
    assert (out / report.REPORT_MD).read_text() == table


def _assert_model_mounts_as_a_node_does(doc: dict[str, Any]) -> None:
    """The model scenario's cafs daemons are forked from its mount server, whose time is
    counted, and they skip the interpreter's start that the spawned contender pays."""
    from bench.scenarios import model

    raw = next(s for s in doc["scenarios"] if s["name"] == "model")["raw"]
    served = next(r for r in raw if r["series"] == f"{model.TIME}: {model.CAFS}")
    spawned = next(r for r in raw if r["series"] == f"{model.TIME}: {model.SPAWNED}")
    assert served["mount_server_cpu_seconds"] >= 0
    assert spawned["mount_server_cpu_seconds"] == 0
    assert served["daemon_start_cpu_seconds"] < spawned["daemon_start_cpu_seconds"] / 2
    threads = served["daemon_threads_cpu_seconds"]  # which of the daemon's threads were busy
    assert threads and all(v >= 0 for v in threads.values()), threads


@pytest.mark.root
@pytest.mark.slow
def test_interrupted_run_cleans_up(tmp_path: Path) -> None:
    """Ctrl-C while a cafs mount is up: everything is removed and the run says so."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    before = _fuse_cafs_mounts()
    proc = _bench("run", "--quick", "--scenario", "read", "--out", str(out), "--workdir", str(work))
    deadline = time.monotonic() + 120
    while not any(mountinfo.is_cafs(point) for point, _ in mounts_under(work)):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no mount appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted" in output
    _assert_nothing_left(work, before)
    doc = json.loads((out / report.RESULTS_JSON).read_text())
    assert doc["complete"] is False
    (partial,) = doc["scenarios"]  # what the interrupted scenario had measured is kept
    assert partial["name"] == "read" and partial["error"].startswith("interrupted after")


class _SignalledInFinalizer:
    """Sends this process SIGINT from its finalizer, where Python drops the handler's
    KeyboardInterrupt ("Exception ignored in"), as it did in a Popen's during a bench run."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs here


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop itself
def test_a_ctrl_c_lost_in_a_finalizer_is_raised_at_the_next_step(tmp_path: Path) -> None:
    ctx = Context(RunOptions(), Workspace(tmp_path))
    try:
        with terminate_raises():
            ctx.step("before")
            _SignalledInFinalizer()  # dropped at once: its __del__ runs here
            with pytest.raises(KeyboardInterrupt):
                ctx.step("after the lost Ctrl-C")
            ctx.step("raised once only")
            try:  # a Ctrl-C that propagates is not raised again by a `finally` on its way
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)
                finally:
                    raise_if_interrupted()
            except KeyboardInterrupt as exc:
                assert exc.__context__ is None
    finally:
        ctx.ws.close()


def test_missing_root_or_unknown_scenario_is_a_clear_error(tmp_path: Path) -> None:
    proc = _bench("run", "--scenario", "nosuch", "--out", str(tmp_path))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "unknown scenario nosuch" in output and "model" in output
    proc = _bench("run", "--scenario", "read", "--link", "1gbit:5ms", "--out", str(tmp_path))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "use it with --store s3" in output
    proc = _bench("run", "--s3-server", "minio", "--out", str(tmp_path))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "unknown S3 server 'minio': use seaweedfs or moto" in output
    if os.geteuid() != 0:
        proc = _bench("run", "--quick", "--out", str(tmp_path))
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2
        assert "run as root" in output


def test_ratios_pair_repeats_and_goals_judge_medians() -> None:
    res = ScenarioResult("x", "test")
    for base, mine in ((100.0, 50.0), (200.0, 150.0), (100.0, 90.0)):
        res.add("read", "native", base, "MB/s", baseline=True)
        res.add("read", "cafs", mine, "MB/s")
    res.compare("cafs / native", "read: cafs", "read: native")
    res.goal("half of native", "cafs / native", ">=", 0.5)
    res.goal("over 100 MB/s", "read: cafs", ">", 100)
    res.finish()
    assert res.ratios[0].samples == [0.5, 0.75, 0.9]
    assert [g.met for g in res.goals] == [True, False]
    assert summary([3.0, 1.0, 2.0]) == {
        "n": 3,
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
        "spread": 1.0,
    }
    again = ScenarioResult.from_json(json.loads(json.dumps(res.to_json())))
    assert again.to_json() == res.to_json()


def test_results_name_the_s3_server(tmp_path: Path) -> None:
    """A result's `store` parameter says which S3 server it came from, not always moto."""
    for server in ("seaweedfs", "moto"):
        ws = Workspace(str(tmp_path))
        try:
            ctx = Context(RunOptions(quick=True, store="s3", s3_server=server), ws)
            assert ctx.store_label("s3://bucket/prefix") == f"s3 ({server})"
            assert ctx.store_label(f"file://{tmp_path}/store") == "file"
        finally:
            assert ws.close() == []


def test_report_from_json(tmp_path: Path) -> None:
    res = ScenarioResult("demo", "a demo")
    res.add("walk", "plain", 10.0, "ms", "lower", True)
    res.add("walk", "cafs", 15.0, "ms", "lower")
    res.compare("cafs / plain", "walk: cafs", "walk: plain")
    res.goal("at most 2x", "cafs / plain", "<=", 2.0)
    res.finish()
    doc = {
        "machine": {"date": "today", "cpu_model": "cpu"},
        "options": {},
        "seconds": 1,
        "scenarios": [res.to_json()],
    }
    (tmp_path / report.RESULTS_JSON).write_text(json.dumps(doc))
    md = report.write(tmp_path).read_text()
    assert "| demo | at most 2x | 1.50 | met |" in md
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.root
def test_fuse_floor_walks_one_tree_three_ways() -> None:
    """bench.floor compiles its C filesystem and walks the same tree from disk, from it and
    from cafs (each walk checks it saw every entry)."""
    from bench.floor.run import main as floor

    (result,) = floor(1, dirs=30, files=4)
    assert result["entries"] == 150
    assert min(result["plain_cold_ms"], result["c_fuse_ms"], result["cafs_ms"]) > 0


def test_link_parsing() -> None:
    assert parse_link("loopback") is None
    link = parse_link("1gbit:10ms")
    assert link == Link("1gbit", 10.0)
    assert link.bytes_per_second == 125e6
    for bad in ("fast", "1gbit:10", "10ms", "1gbit:x"):
        with pytest.raises(ValueError):
            parse_link(bad)


@pytest.mark.root
def test_shaped_link_forwards_through_the_proxy_and_is_removed(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello")
    with namespace(Link("100mbit", 5.0)) as ns:
        assert ns.name in namespaces()
        port = free_port()
        cmd = [*ns.wrap, sys.executable, "-m", "http.server", "-b", ns.ns_ip, str(port)]
        quiet = subprocess.DEVNULL
        server = subprocess.Popen(cmd, cwd=tmp_path, stdout=quiet, stderr=quiet)
        try:
            wait_http(f"http://{ns.ns_ip}:{port}/", server, None)
            proxy_port = free_port()
            with delay_proxy(proxy_port, ns.ns_ip, port, 5.0):
                got = requests.get(f"http://127.0.0.1:{proxy_port}/hello.txt", timeout=10)
                assert got.text == "hello"
        finally:
            stop_process(server)
    assert ns.name not in namespaces()
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert ns.name not in links


def test_chunk_size_defaults_to_what_cafs_index_uses(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import build_parser
    from indexer.build import DEFAULT_WEIGHTS_CHUNK_SIZE

    parse = build_parser().parse_args
    assert parse(["run"]).weights_chunk_size == DEFAULT_WEIGHTS_CHUNK_SIZE
    assert parse(["run", "--weights-chunk-size", "4"]).weights_chunk_size == 4 << 20
    for bad in ("0", "x", "2000"):
        with pytest.raises(SystemExit):
            parse(["run", "--weights-chunk-size", bad])
    assert "chunk size" in capsys.readouterr().err


def test_tree_cpu_seconds_counts_every_process_started() -> None:
    """What a cafs mount costs includes the processes its daemon starts: one it already
    reaped and one still running are both counted, the process's own time alone is not."""
    from bench.workspace import cpu_seconds, tree_cpu_seconds

    code = """
import os, sys, time
def burn():
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass
pid = os.fork()
if pid == 0:
    burn(); os._exit(0)
os.waitpid(pid, 0)  # reaped: its time is in our cutime
r, w = os.pipe()
if os.fork() == 0:
    burn(); os.write(w, b"x"); time.sleep(60); os._exit(0)
os.read(r, 1)  # still running, having burnt its share
print("ready", flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        assert tree_cpu_seconds(proc.pid) >= 0.9
        assert cpu_seconds(proc.pid) < 0.5
    finally:
        for child in _children(proc.pid):
            os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.wait()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def test_cafs_run_statistics_are_parsed_from_what_the_cli_prints() -> None:
    """The coldstart scenario reads `cafs run --stats`: a change to the CLI's wording must fail
    here, not turn the wire's bytes into the decoded ones in a results page."""
    from bench.scenarios.coldstart import parse_run_stats
    from cafs.cli.mounts import _fmt
    from cafs.daemon.stats import MountStats

    stats = MountStats()
    stats.image_bytes = 600 << 20
    stats.fetched(36 << 20, prefetch=False)
    stats.fetched(3 << 20, prefetch=True)
    stats.store_gets, stats.store_bytes = 41, 19 << 20
    stats.neighbour_gets, stats.neighbour_bytes, stats.library_blobs = 9, 4 << 20, 6
    parsed = parse_run_stats(_fmt(stats.snapshot()))
    assert parsed == {
        "demand_bytes": 36 << 20, "demand_blobs": 1,
        "prefetch_bytes": 3 << 20, "prefetch_blobs": 1,
        "store_gets": 41, "neighbour_gets": 9, "neighbour_bytes": 4 << 20,
        "store_bytes": 19 << 20,
    }
    with pytest.raises(RuntimeError, match="no store requests"):
        parse_run_stats("fetched on demand: 1.0 MiB (2 blobs)\n")
