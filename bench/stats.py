"""Figures, percentiles and the repeated-run record every section writes into.

A *figure* is one named number (``claims.cflow.always.n16.rate``) measured once
per repeat; the report shows its median and spread (min/max) over the repeats,
next to the median of its *baseline* figure measured in the same run, and the
ratio ``value / baseline``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    frac = pos - lo
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * frac)


def latency_summary(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds of a list of latencies in seconds."""
    ms = [v * 1000.0 for v in values_s]
    return {
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else math.nan,
        "n": float(len(ms)),
    }


@dataclass
class Goal:
    """``on`` is "value" or "ratio"; the goal is met when ``on <op> threshold``."""

    on: str
    op: str  # "<=" or ">="
    threshold: float
    text: str

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        x = value if self.on == "value" else ratio
        if x is None or math.isnan(x):
            return None
        return x <= self.threshold if self.op == "<=" else x >= self.threshold


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    section: str
    runs: list[float] = field(default_factory=list)
    baseline: str | None = None  # key of the baseline figure
    durability: str = "n/a"
    better: str = "lower"  # "lower" or "higher"
    goals: list[Goal] = field(default_factory=list)
    note: str = ""
    na: str | None = None  # reason the figure could not be measured
    is_baseline: bool = False

    @property
    def median(self) -> float | None:
        vals = [v for v in self.runs if not math.isnan(v)]
        return float(statistics.median(vals)) if vals else None

    @property
    def spread(self) -> tuple[float, float] | None:
        vals = [v for v in self.runs if not math.isnan(v)]
        return (min(vals), max(vals)) if vals else None


class Record:
    """All figures of one benchmark run, in the order they were first added."""

    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}
        self.errors: dict[str, str] = {}
        self.notes: list[str] = []

    def add(self, key: str, value: float, *, label: str, unit: str, section: str,
            baseline: str | None = None, durability: str = "n/a", better: str = "lower",
            goals: Sequence[Goal] = (), note: str = "", is_baseline: bool = False) -> Figure:
        fig = self.figures.get(key)
        if fig is None:
            fig = Figure(key=key, label=label, unit=unit, section=section, baseline=baseline,
                         durability=durability, better=better, goals=list(goals), note=note,
                         is_baseline=is_baseline)
            self.figures[key] = fig
        fig.runs.append(float(value))
        return fig

    def na(self, key: str, reason: str, *, label: str, unit: str, section: str,
           note: str = "") -> Figure:
        fig = Figure(key=key, label=label, unit=unit, section=section, na=reason, note=note)
        self.figures[key] = fig
        return fig

    def ratio(self, fig: Figure) -> float | None:
        if fig.baseline is None:
            return None
        base = self.figures.get(fig.baseline)
        value = fig.median
        base_value = base.median if base is not None else None
        if value is None or base_value is None or base_value == 0.0:
            return None
        return value / base_value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, fig in self.figures.items():
            d = asdict(fig)
            d.pop("goals")
            spread = fig.spread
            ratio = self.ratio(fig)
            base = self.figures.get(fig.baseline) if fig.baseline else None
            d.update(
                median=fig.median,
                min=spread[0] if spread else None,
                max=spread[1] if spread else None,
                baseline_median=base.median if base else None,
                ratio=ratio,
                goals=[{"text": g.text, "met": g.met(fig.median, ratio)} for g in fig.goals],
            )
            out[key] = d
        return out
