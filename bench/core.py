"""What a benchmark run is made of: options, results, and the registry of scenarios.

A scenario is a function that takes a `Context` and fills in a `ScenarioResult`. It measures
a contender (cafs) and its baseline side by side in the same repeat, so both see the same
machine at the same moment; ratios are taken per repeat, then summarised. Every raw sample is
kept: the JSON is the record, the table and plots are views of it.

To add a scenario, write `bench/scenarios/NAME.py` with a function decorated by
`@register("NAME", "title", tools=(...))` and import the module in
`bench/scenarios/__init__.py`. Planned ones are listed in `PLANNED`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from bench.context import Context

Better = Literal["higher", "lower"]
Op = Literal[">=", "<=", "<", ">"]

PLANNED: dict[str, str] = {}  # name -> title of scenarios not written yet


@dataclass(frozen=True)
class RunOptions:
    quick: bool = False
    repeat: int = 3
    store: Literal["file", "s3"] = "file"
    s3_server: Literal["seaweedfs", "moto"] = "seaweedfs"  # which S3 server the run starts
    link: str = "loopback"  # or "RATE:DELAY", e.g. "1gbit:10ms"
    workdir: str | None = None  # where temp dirs go (default: $TMPDIR or /tmp)
    weights_chunk_size: int = 16 << 20  # the model scenario's `cafs index --weights-chunk-size`


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median and spread of samples: min, max, and (max - min) / median."""
    if not samples:
        return {"n": 0, "median": math.nan, "min": math.nan, "max": math.nan, "spread": math.nan}
    med = statistics.median(samples)
    lo, hi = min(samples), max(samples)
    return {
        "n": len(samples),
        "median": med,
        "min": lo,
        "max": hi,
        "spread": (hi - lo) / med if med else math.nan,
    }


@dataclass
class Series:
    """The samples of one contender on one measure, one per repeat."""

    group: str  # what is measured, e.g. "sequential read"; one plot panel per group
    contender: str  # e.g. "cafs, page cache dropped" or "native, page cache dropped"
    unit: str
    better: Better
    baseline: bool = False
    samples: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.group}: {self.contender}"


@dataclass
class Ratio:
    """contender / baseline, taken within each repeat."""

    label: str
    numerator: str  # Series.key
    denominator: str  # Series.key
    samples: list[float] = field(default_factory=list)


@dataclass
class Goal:
    """A target from the issues, judged on the median of a series or a ratio."""

    text: str
    metric: str  # Series.key or Ratio.label
    op: Op
    target: float
    value: float = math.nan
    met: bool | None = None

    def judge(self, value: float) -> None:
        self.value = value
        if math.isnan(value):
            self.met = None
            return
        checks: dict[str, Callable[[float, float], bool]] = {
            ">=": lambda a, b: a >= b,
            "<=": lambda a, b: a <= b,
            "<": lambda a, b: a < b,
            ">": lambda a, b: a > b,
        }
        self.met = checks[self.op](value, self.target)


@dataclass
class ScenarioResult:
    name: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    series: list[Series] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)  # per-sample details
    error: str | None = None
    seconds: float = 0.0

    def series_for(
        self, group: str, contender: str, unit: str, better: Better, baseline: bool = False
    ) -> Series:
        for s in self.series:
            if s.group == group and s.contender == contender:
                return s
        s = Series(group, contender, unit, better, baseline)
        self.series.append(s)
        return s

    def add(
        self,
        group: str,
        contender: str,
        value: float,
        unit: str,
        better: Better = "higher",
        baseline: bool = False,
        **details: Any,
    ) -> None:
        """Record one sample; `details` go into `raw` beside it."""
        s = self.series_for(group, contender, unit, better, baseline)
        s.samples.append(value)
        self.raw.append({"series": s.key, "repeat": len(s.samples) - 1, "value": value, **details})

    def compare(self, label: str, numerator: str, denominator: str) -> None:
        self.ratios.append(Ratio(label, numerator, denominator))

    def goal(self, text: str, metric: str, op: Op, target: float) -> None:
        self.goals.append(Goal(text, metric, op, target))

    def finish(self) -> None:
        """Pair up ratio samples repeat by repeat and judge the goals on medians."""
        by_key = {s.key: s for s in self.series}
        for r in self.ratios:
            num, den = by_key.get(r.numerator), by_key.get(r.denominator)
            if num is None or den is None:
                continue
            r.samples = [a / b for a, b in zip(num.samples, den.samples, strict=False) if b]
        ratios = {r.label: r for r in self.ratios}
        for g in self.goals:
            samples = (
                ratios[g.metric].samples
                if g.metric in ratios
                else by_key[g.metric].samples
                if g.metric in by_key
                else []
            )
            g.judge(summary(samples)["median"])

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for s, d in zip(self.series, doc["series"], strict=True):
            d["key"] = s.key
            d["summary"] = summary(s.samples)
        for r, d in zip(self.ratios, doc["ratios"], strict=True):
            d["summary"] = summary(r.samples)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ScenarioResult:
        series = [
            Series(d["group"], d["contender"], d["unit"], d["better"], d["baseline"], d["samples"])
            for d in doc["series"]
        ]
        ratios = [
            Ratio(d["label"], d["numerator"], d["denominator"], d["samples"]) for d in doc["ratios"]
        ]
        goals = [Goal(**d) for d in doc["goals"]]
        fields = ("params", "notes", "raw", "error", "seconds")
        rest = {k: doc[k] for k in fields if k in doc}
        return cls(doc["name"], doc["title"], series=series, ratios=ratios, goals=goals, **rest)


ScenarioFn = Callable[["Context", ScenarioResult], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    fn: ScenarioFn
    tools: tuple[str, ...] = ()  # executables it needs on PATH
    needs_root: bool = True
    # Always fetches from the S3 server, whatever --store says, so --link shapes it
    # without --store s3 (model, pack, coldstart compare S3 clients).
    always_s3: bool = False


SCENARIOS: dict[str, Scenario] = {}


def register(
    name: str,
    title: str,
    tools: Sequence[str] = (),
    needs_root: bool = True,
    always_s3: bool = False,
) -> Callable[[ScenarioFn], ScenarioFn]:
    def wrap(fn: ScenarioFn) -> ScenarioFn:
        SCENARIOS[name] = Scenario(name, title, fn, tuple(tools), needs_root, always_s3)
        return fn

    return wrap
