"""Views of a run's JSON: a markdown report and one PNG per scenario.

Tables give the median, the range (min to max) and the number of samples of every series, the
ratios of cafs to its baseline (taken within each repeat), and each goal with its verdict.
Plots show one panel per measure: a bar at the median, a line over the range, a dot per
sample, baselines in grey, goals as red dashed lines; and a panel of the ratios.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.core import ScenarioResult, Series, summary
from bench.machine import one_line

RESULTS_JSON = "results.json"
REPORT_MD = "results.md"
DASH, TIMES = "\u2013", "\u00d7"
CAFS_COLOR, BASE_COLOR, GOAL_COLOR = "#2b6cb0", "#a0aec0", "#c53030"


def fmt(value: float) -> str:
    if math.isnan(value):
        return DASH
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[met]


def load(out_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((out_dir / RESULTS_JSON).read_text())
    return doc


def scenario_results(doc: dict[str, Any]) -> list[ScenarioResult]:
    return [ScenarioResult.from_json(s) for s in doc["scenarios"]]


def goals_table(results: list[ScenarioResult]) -> list[str]:
    lines = ["| scenario | goal | measured (median) | verdict |", "|---|---|---|---|"]
    for r in results:
        for g in r.goals:
            lines.append(f"| {r.name} | {g.text} | {fmt(g.value)} | {_verdict(g.met)} |")
    return lines


def scenario_markdown(r: ScenarioResult, image: str | None) -> list[str]:
    lines = [f"### {r.name}: {r.title}", ""]
    if r.error:
        lines += [f"**Failed:** `{r.error}`", ""]
    if r.params:
        params = ", ".join(f"{k}={v}" for k, v in r.params.items())
        lines += [f"Parameters: {params}.", ""]
    if r.series:
        lines += [
            f"| measure | contender | unit | median | min {DASH} max | n |",
            "|---|---|---|---:|---:|---:|",
        ]
        order = list(dict.fromkeys(s.group for s in r.series))
        for s in sorted(r.series, key=lambda s: order.index(s.group)):
            st = summary(s.samples)
            name = f"{s.contender} *(baseline)*" if s.baseline else s.contender
            lines.append(
                f"| {s.group} | {name} | {s.unit} | {fmt(st['median'])} | "
                f"{fmt(st['min'])} {DASH} {fmt(st['max'])} | {st['n']} |"
            )
        lines.append("")
    if r.ratios:
        lines += [f"| ratio (per repeat) | median | min {DASH} max |", "|---|---:|---:|"]
        for ratio in r.ratios:
            st = summary(ratio.samples)
            spread = f"{fmt(st['min'])} {DASH} {fmt(st['max'])}"
            lines.append(f"| {ratio.label} | {fmt(st['median'])}{TIMES} | {spread} |")
        lines.append("")
    if r.goals:
        lines += ["| goal | measured (median) | verdict |", "|---|---:|---|"]
        lines += [f"| {g.text} | {fmt(g.value)} | {_verdict(g.met)} |" for g in r.goals]
        lines.append("")
    lines += [f"- {note}" for note in r.notes]
    if r.notes:
        lines.append("")
    if image:
        lines += [f"![{r.name}]({image})", ""]
    return lines


def markdown(doc: dict[str, Any], images: dict[str, str]) -> str:
    results = scenario_results(doc)
    opts = doc.get("options", {})
    lines = [
        "# cafs benchmark results",
        "",
        f"- date: {doc['machine'].get('date', '?')}",
        f"- machine: {one_line(doc['machine'])}",
        f"- options: {', '.join(f'{k}={v}' for k, v in opts.items())}",
        f"- commit: {doc['machine'].get('cafs_commit', '?')} at start, "
        f"{doc.get('cafs_commit_end', '?')} at end",
        f"- total time: {doc.get('seconds', 0):.0f} s; {_load(doc)}",
        "",
        "## Goals",
        "",
        *goals_table(results),
        "",
        "## Scenarios",
        "",
    ]
    for r in results:
        lines += scenario_markdown(r, images.get(r.name))
    return "\n".join(lines) + "\n"


def _load(doc: dict[str, Any]) -> str:
    """The 1-minute load average at start and end: how busy the machine was."""
    start, end = doc["machine"].get("loadavg_start"), doc.get("loadavg_end")
    if not start or not end:
        return "load average not recorded"
    cores = doc["machine"].get("cores", "?")
    return f"load average {start[0]:.1f} at start, {end[0]:.1f} at end ({cores} cores)"


def _panel(ax: Any, series: list[Series], goals: list[tuple[str, float]], title: str) -> None:
    ys = list(range(len(series)))[::-1]
    top = 0.0
    for y, s in zip(ys, series, strict=True):
        st = summary(s.samples)
        color = BASE_COLOR if s.baseline else CAFS_COLOR
        ax.barh(y, st["median"], color=color, height=0.6)
        ax.plot([st["min"], st["max"]], [y, y], color="black", linewidth=1)
        ax.scatter(s.samples, [y] * len(s.samples), color="black", s=10, zorder=3)
        ax.text(st["median"], y + 0.33, f" {fmt(st['median'])}", va="center", fontsize=8)
        top = max(top, st["max"] if not math.isnan(st["max"]) else 0.0)
    ax.set_yticks(ys, [s.contender for s in series], fontsize=8)
    for text, target in goals:
        ax.axvline(target, color=GOAL_COLOR, linestyle="--", linewidth=1, label=f"goal: {text}")
        top = max(top, target)
    if goals:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.18), fontsize=7, frameon=False)
    medians = [m for m in (summary(s.samples)["median"] for s in series) if m > 0]
    if medians and max(medians) / min(medians) > 30:  # one bar would flatten the others
        ax.set_xscale("log")
        ax.set_xlim(min(medians) / 3, top * 2)
        title += " [log scale]"
    else:
        ax.set_xlim(0, top * 1.15 or 1)
    ax.set_title(title, fontsize=10)


def _title(series: list[Series]) -> str:
    first = series[0]
    better = {s.better for s in series}
    hint = f", {first.better} is better" if len(better) == 1 else ""
    return f"{first.group} ({first.unit}{hint})"


def plot(r: ScenarioResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Series]] = {}
    for s in r.series:
        groups.setdefault(s.group, []).append(s)
    panels: list[tuple[list[Series], list[tuple[str, float]]]] = []
    for members in groups.values():
        keys = {s.key for s in members}
        goals = [(g.text, g.target) for g in r.goals if g.metric in keys]
        panels.append((members, goals))
    if r.ratios:
        better = {s.key: s.better for s in r.series}
        ratio_series = [
            Series("ratio to baseline", x.label, TIMES, better.get(x.numerator, "higher"))
            for x in r.ratios
        ]
        for series, ratio in zip(ratio_series, r.ratios, strict=True):
            series.samples = ratio.samples
        labels = {x.label for x in r.ratios}
        goals = [(g.text, g.target) for g in r.goals if g.metric in labels]
        panels.append((ratio_series, goals))
    if not panels:
        return
    heights = [1.2 + 0.45 * len(p[0]) + 0.15 * len(p[1]) for p in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, sum(heights)), gridspec_kw={"height_ratios": heights}
    )
    for ax, (members, goals) in zip(list(getattr(axes, "flat", [axes])), panels, strict=True):
        _panel(ax, members, goals, _title(members))
        if members[0].unit == TIMES:
            ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
    store = f" (store: {r.params['store']})" if "store" in r.params else ""
    fig.suptitle(f"{r.name}: {r.title}{store}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write(out_dir: Path) -> Path:
    """Write results.md and one PNG per scenario beside results.json; returns the .md."""
    doc = load(out_dir)
    images: dict[str, str] = {}
    for r in scenario_results(doc):
        if r.series:
            plot(r, out_dir / f"{r.name}.png")
            images[r.name] = f"{r.name}.png"
    path = out_dir / REPORT_MD
    path.write_text(markdown(doc, images))
    return path
