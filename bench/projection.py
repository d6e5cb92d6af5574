"""Section "projection" (5): delegates to ``bench/bench_projection.py`` when it exists
(written with the projections; contract in its module docstring / the runner notes)."""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any

from bench.context import Ctx
from bench.servers import DURABILITY
from bench.stats import Goal

KNOWN: dict[str, dict[str, Any]] = {
    "ingest_events_per_s": {"label": "projector ingest", "unit": "events/s", "better": "higher",
                                "baseline": "projection.executemany_events_per_s",
                                "goals": [Goal("value", ">=", 50_000, ">= 50k events/s")]},
    "executemany_events_per_s": {"label": "plain executemany of the same rows (control)",
                                     "unit": "events/s", "better": "higher", "is_baseline": True},
    "lag_p99_ms": {"label": "projection lag p99 at 1k events/s", "unit": "ms"},
    "rebuild_s": {"label": "rebuild time", "unit": "s"},
    "rebuild_events": {"label": "events replayed by the rebuild", "unit": "events",
                           "better": "higher"},
    "fold_events_per_s": {"label": "pure fold alone (no DuckDB)", "unit": "events/s",
                          "better": "higher"},
    "events_appender_rows_per_s": {"label": "events table rows via DuckDB appender",
                                   "unit": "rows/s", "better": "higher",
                                   "baseline": "projection.executemany_events_per_s"},
    "ingest_e2e_events_per_s": {"label": "rebuild from NATS, end to end", "unit": "events/s",
                                "better": "higher"},
    "append_events_per_s": {"label": "filling the stream for the rebuild", "unit": "events/s",
                            "better": "higher"},
    "lag_p50_ms": {"label": "projection lag p50 at 1k events/s", "unit": "ms"},
    "lag_max_ms": {"label": "projection lag max at 1k events/s", "unit": "ms"},
    "lag_events": {"label": "events measured for lag", "unit": "events", "better": "higher"},
}


async def projection(ctx: Ctx) -> None:
    try:
        mod = importlib.import_module("bench.bench_projection")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.bench_projection":
            raise
        ctx.rec.na("projection.ingest_events_per_s", "bench/bench_projection.py does not exist",
                   label="projector ingest", unit="events/s", section="5 projection")
        return
    fn = getattr(mod, "run", None) or getattr(mod, "main", None)
    if fn is None:
        raise RuntimeError("bench/bench_projection.py has no run() or main()")
    offer = {"url": ctx.servers.url("default"), "quick": ctx.quick, "tmp": ctx.tmp,
             "ctx": ctx}
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in offer.items() if k in params}
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, dict):
        return  # it recorded into ctx.rec itself
    for key, value in result.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        meta = dict(KNOWN.get(key, {"label": key.replace("_", " "), "unit": ""}))
        ctx.rec.add(f"projection.{key}", float(value) if not math.isnan(value) else math.nan,
                    section="5 projection", durability=DURABILITY["default"], **meta)
