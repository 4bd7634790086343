"""`python -m bench run|report|list`: run scenarios side by side, then write JSON, table, plots.

Usage::

    python -m bench run [--quick] [--scenario NAME ...] [--repeat N] [--out results/]
                        [--store file|s3] [--s3-server seaweedfs|moto]
                        [--link loopback|RATE:DELAY] [--workdir DIR]
    python -m bench report results/
    python -m bench list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bench import machine, report
from bench.context import Context
from bench.core import PLANNED, SCENARIOS, RunOptions, Scenario, ScenarioResult

console = Console(stderr=True, highlight=False, log_path=False)


class Unmet(Exception):
    """What the run needs and this machine lacks; the message says how to get it."""


class RichReporter:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("", total=None)
        self.scenario = ""

    def step(self, text: str) -> None:
        self.progress.update(self.task, description=f"[bold]{self.scenario}[/]: {text}")

    def log(self, text: str) -> None:
        self.progress.console.log(text)


def check_requirements(scenarios: Sequence[Scenario], opts: RunOptions) -> None:
    problems = []
    if any(s.needs_root for s in scenarios) and os.geteuid() != 0:
        problems.append(
            "run as root: the scenarios mount FUSE filesystems, chroot, unpack "
            "images with umoci and drop page caches"
        )
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    tools = {t for s in scenarios for t in s.tools}
    if opts.link != "loopback":
        tools |= {"ip", "tc"}
    packages = {
        "umoci": "umoci",
        "runc": "runc",
        "fincore": "util-linux-extra",
        "chroot": "coreutils",
        "ip": "iproute2",
        "tc": "iproute2",
    }
    for tool in sorted(tools):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is missing: apt-get install {packages.get(tool, tool)}")
    s3 = opts.store == "s3" or any(s.always_s3 for s in scenarios)
    modules = ["matplotlib"] + (["moto"] if s3 and opts.s3_server == "moto" else [])
    if s3 and opts.s3_server == "seaweedfs":
        from bench.seaweed import SeaweedMissing, weed_binary

        try:
            weed_binary()
        except SeaweedMissing as exc:
            problems.append(f"{exc}, or run with --s3-server moto")
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            problems.append(f"Python package {module} is missing: pip install '.[bench]' "
                            "(or `make deps`)")
    if problems:
        raise Unmet("cannot run the benchmarks:\n  - " + "\n  - ".join(problems))


def select(names: Sequence[str] | None) -> list[Scenario]:
    import bench.scenarios  # noqa: F401 (registers them)

    if not names:
        return list(SCENARIOS.values())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        planned = [n for n in unknown if n in PLANNED]
        hint = f" ({', '.join(planned)}: planned, not written yet)" if planned else ""
        raise Unmet(
            f"unknown scenario {', '.join(unknown)}{hint}; available: {', '.join(SCENARIOS)}"
        )
    return [SCENARIOS[n] for n in names]


CODE_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("blobstore", "indexer", "cafs", "snapshotter", "bench")


def compile_code() -> None:
    """Write the packages' bytecode before anything is timed, as an installed cafs has it.
    With PYTHONDONTWRITEBYTECODE set (this project's dev machines) or a read-only checkout,
    every cafs process compiled its modules from source: 38 ms of a `cafs mount` command's
    214 ms, measured."""
    import compileall

    for package in PACKAGES:
        compileall.compile_dir(CODE_ROOT / package, quiet=1)


def run_scenarios(
    scenarios: Sequence[Scenario], opts: RunOptions, out: Path, argv: Sequence[str]
) -> int:
    from bench.netshape import shaped_link
    from bench.workspace import (
        Workspace,
        interrupt_handled,
        raise_if_interrupted,
        terminate_raises,
    )

    started = time.monotonic()
    compile_code()
    doc: dict[str, Any] = {
        "suite": "cafs-bench",
        "format": 1,
        "command": list(argv),
        "options": dataclasses.asdict(opts),
        "scenarios": [],
    }
    failed, interrupted = 0, False
    with terminate_raises():
        ws = Workspace(opts.workdir)
        try:
            doc["machine"] = machine.describe(ws.root)
            columns = (
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console, transient=True) as progress:
                reporter = RichReporter(progress)
                ctx = Context(opts, ws, reporter)
                ctx.stack.enter_context(shaped_link(ctx))
                overall = progress.add_task("scenarios", total=len(scenarios))
                for scenario in scenarios:
                    raise_if_interrupted()
                    reporter.scenario = scenario.name
                    result = ScenarioResult(scenario.name, scenario.title)
                    try:
                        _run_one(ctx, scenario, result)
                    except KeyboardInterrupt:  # keep what it measured so far
                        result.error = f"interrupted after {result.seconds:.0f} s"
                        raise
                    finally:
                        failed += result.error is not None
                        doc["scenarios"].append(result.to_json())
                    progress.advance(overall)
        except KeyboardInterrupt:
            interrupted = True
            interrupt_handled()
            console.print("[yellow]interrupted: cleaning up[/]")
        finally:
            forced = ws.close()
            for line in forced:
                console.print(f"[yellow]teardown: {line}[/]")
    doc["seconds"] = time.monotonic() - started
    doc["loadavg_end"] = list(os.getloadavg())
    doc["cafs_commit_end"] = machine.git_commit()  # others may commit while a run goes on
    doc["complete"] = not interrupted and not failed
    out.mkdir(parents=True, exist_ok=True)
    (out / report.RESULTS_JSON).write_text(json.dumps(doc, indent=1) + "\n")
    md = report.write(out)
    _print_goals(doc)
    console.print(f"results: {out / report.RESULTS_JSON}, {md}, plots in {out}")
    return 130 if interrupted else 1 if failed else 0


def _run_one(ctx: Context, scenario: Scenario, result: ScenarioResult) -> None:
    result.params["repeat"] = ctx.repeat
    result.params["loadavg_at_start"] = round(os.getloadavg()[0], 2)
    started = time.monotonic()
    ctx.step("starting")
    try:
        scenario.fn(ctx, result)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        ctx.log(f"[red]{scenario.name} failed[/]: {result.error}")
        (ctx.ws.logs / f"{scenario.name}.traceback").write_text(traceback.format_exc())
        console.print(traceback.format_exc(), markup=False)
    finally:
        result.seconds = time.monotonic() - started
        result.finish()


def _print_goals(doc: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("scenario", "goal", "median", "verdict", title="goals")
    for r in report.scenario_results(doc):
        for g in r.goals:
            verdict = {True: "[green]met[/]", False: "[red]not met[/]", None: "-"}[g.met]
            table.add_row(r.name, g.text, report.fmt(g.value), verdict)
        if r.error:
            table.add_row(r.name, "[red]failed[/]", "", r.error[:80])
    console.print(table)


def _mib(text: str) -> int:
    try:
        mib = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    if not 1 <= mib <= 1024:
        raise argparse.ArgumentTypeError(f"chunk size must be 1 to 1024 MiB, not {mib}")
    return mib << 20


def _s3_server(text: str) -> str:
    from bench.services import s3_server_name

    try:
        return s3_server_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="cafs benchmark suite")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run scenarios and write results, table and plots")
    r.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    r.add_argument("--scenario", action="append", metavar="NAME", help="repeatable; default all")
    r.add_argument("--repeat", type=int, help="repeats per scenario (default 3; --quick 2)")
    r.add_argument("--out", type=Path, default=Path("results"), help="output dir (results/)")
    r.add_argument(
        "--store",
        choices=("file", "s3"),
        default="file",
        help="store for read/startup/metadata: file:// or S3 over HTTP",
    )
    r.add_argument(
        "--s3-server",
        type=_s3_server,
        default="seaweedfs",
        metavar="seaweedfs|moto",
        help="the S3 server the run starts: SeaweedFS, a real object store (default), "
        "or moto's mock",
    )
    r.add_argument(
        "--link",
        default="loopback",
        help="loopback, or RATE:DELAY (e.g. 1gbit:10ms) to shape the S3 link",
    )
    r.add_argument("--workdir", help="where temp files go (default $TMPDIR or /tmp)")
    r.add_argument(
        "--weights-chunk-size",
        type=_mib,
        default="16",  # a string, so that argparse converts it like a given value
        metavar="MIB",
        help="chunk size the model scenario indexes its weights with, in MiB (16, cafs's)",
    )
    rep = sub.add_parser("report", help="write results.md and PNGs from a results dir")
    rep.add_argument("out", type=Path)
    sub.add_parser("list", help="list the scenarios")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            for s in select(None):
                console.print(f"{s.name:10} {s.title}")
            for name, title in PLANNED.items():
                console.print(f"{name:10} (planned) {title}")
            return 0
        if args.command == "report":
            console.print(f"wrote {report.write(args.out)}")
            return 0
        repeat = args.repeat or (2 if args.quick else 3)
        if repeat < 1:
            raise Unmet("--repeat must be at least 1")
        opts = RunOptions(
            quick=args.quick, repeat=repeat, store=args.store, s3_server=args.s3_server,
            link=args.link, workdir=args.workdir, weights_chunk_size=args.weights_chunk_size,
        )
        from bench.netshape import parse_link

        scenarios = select(args.scenario)
        uses_store = [s.name for s in scenarios if not s.always_s3]
        if parse_link(opts.link) is not None and opts.store != "s3" and uses_store:
            raise Unmet(
                "--link shapes the link to the S3 server: use it with --store s3 "
                f"(--store is the store of {', '.join(uses_store)}; "
                f"{', '.join(n for n, s in SCENARIOS.items() if s.always_s3)} always use S3)"
            )
        check_requirements(scenarios, opts)
        return run_scenarios(scenarios, opts, args.out, sys.argv if argv is None else argv)
    except (Unmet, ValueError) as exc:
        console.print(f"[red]bench:[/] {exc}")
        return 2
