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
                                "goals": [Goal("value", ">=", 100_000, ">= 100k events/s")]},
    "executemany_events_per_s": {"label": "plain executemany of the same rows (control)",
                                     "unit": "events/s", "better": "higher", "is_baseline": True},
    "lag_p99_ms": {"label": "projection lag p99 at 1k events/s", "unit": "ms"},
    "rebuild_s": {"label": "rebuild time (one process, own NATS reader: the default)",
                  "unit": "s", "baseline": "projection.rebuild_nats_py_s"},
    "rebuild_nats_py_s": {"label": "rebuild time, reading through nats-py (control)",
                          "unit": "s", "is_baseline": True},
    "rebuild_cpu_us_per_event": {"label": "rebuild CPU per event (own NATS reader)",
                                 "unit": "us", "baseline":
                                 "projection.rebuild_nats_py_cpu_us_per_event"},
    "rebuild_nats_py_cpu_us_per_event": {"label": "rebuild CPU per event, nats-py reader",
                                         "unit": "us", "is_baseline": True},
    "load_avg_1m": {"label": "load average (1 min) when the rebuilds started", "unit": ""},
    "raw_read_native_events_per_s": {"label": "reading the stream alone, own NATS reader",
                                     "unit": "events/s", "better": "higher",
                                     "baseline": "projection.raw_read_events_per_s"},
    "rebuild_split_s": {"label": "rebuild time, reader + replay child process (split=True)",
                        "unit": "s", "baseline": "projection.rebuild_s"},
    "rebuild_split_cpu_us_per_event": {"label": "rebuild CPU per event, split=True (both "
                                       "processes)", "unit": "us",
                                       "baseline": "projection.rebuild_cpu_us_per_event"},
    "raw_read_events_per_s": {"label": "reading the stream alone, nats-py (undecoded)",
                              "unit": "events/s", "better": "higher", "is_baseline": True},
    "rebuild_1m_projected_s": {"label": "rebuild time projected to 1M events", "unit": "s",
                               "goals": [Goal("value", "<=", 20, "<= 20 s")]},
    "rebuild_events": {"label": "events replayed by the rebuild", "unit": "events",
                           "better": "higher"},
    "fold_events_per_s": {"label": "pure fold alone (no DuckDB)", "unit": "events/s",
                          "better": "higher"},
    "events_appender_rows_per_s": {"label": "events table rows via DuckDB appender",
                                   "unit": "rows/s", "better": "higher",
                                   "baseline": "projection.executemany_events_per_s"},
    "ingest_e2e_events_per_s": {"label": "rebuild from NATS, end to end", "unit": "events/s",
                                "better": "higher",
                                "baseline": "projection.raw_read_events_per_s"},
    "append_events_per_s": {"label": "filling the stream for the rebuild", "unit": "events/s",
                            "better": "higher"},
    "lag_p50_ms": {"label": "projection lag p50 at 1k events/s", "unit": "ms"},
    "lag_max_ms": {"label": "projection lag max at 1k events/s", "unit": "ms"},
    "lag_events": {"label": "events measured for lag", "unit": "events", "better": "higher"},
    "lag_1k_p50_ms": {"label": "lag p50 at 1k events/s (producer process)", "unit": "ms",
                      "baseline": "projection.lag_1k_nats_py_p50_ms"},
    "lag_1k_p99_ms": {"label": "lag p99 at 1k events/s (producer process)", "unit": "ms",
                      "baseline": "projection.lag_1k_nats_py_p99_ms",
                      "goals": [Goal("value", "<=", 50, "<= 50 ms")]},
    "lag_1k_max_ms": {"label": "lag max at 1k events/s", "unit": "ms"},
    "lag_1k_nats_py_p50_ms": {"label": "lag p50 at 1k events/s, nats-py reader", "unit": "ms",
                              "is_baseline": True},
    "lag_1k_nats_py_p99_ms": {"label": "lag p99 at 1k events/s, nats-py reader", "unit": "ms",
                              "is_baseline": True},
    "lag_10k_nats_py_p50_ms": {"label": "lag p50 at 10k events/s, nats-py reader",
                               "unit": "ms", "is_baseline": True},
    "lag_10k_nats_py_p99_ms": {"label": "lag p99 at 10k events/s, nats-py reader",
                               "unit": "ms", "is_baseline": True},
    "lag_10k_p50_ms": {"label": "lag p50 at 10k events/s (producer process)", "unit": "ms",
                       "baseline": "projection.lag_10k_nats_py_p50_ms"},
    "lag_10k_p99_ms": {"label": "lag p99 at 10k events/s (producer process)", "unit": "ms",
                       "baseline": "projection.lag_10k_nats_py_p99_ms",
                       "goals": [Goal("value", "<=", 200, "<= 200 ms")]},
    "lag_10k_max_ms": {"label": "lag max at 10k events/s", "unit": "ms"},
    "query_rr_p50_ms": {"label": "bare NATS request/reply p50 (query baseline)", "unit": "ms",
                        "is_baseline": True},
    "query_p50_ms": {"label": "query point lookup p50 (QueryClient, NATS round trip)",
                     "unit": "ms", "baseline": "projection.query_rr_p50_ms",
                     "goals": [Goal("value", "<=", 5, "<= 5 ms")]},
    "query_p99_ms": {"label": "query point lookup p99", "unit": "ms"},
    "query_ryw_p50_ms": {"label": "query p50 with read-your-writes (wait_for_seq)",
                         "unit": "ms", "baseline": "projection.query_rr_p50_ms",
                         "goals": [Goal("value", "<=", 5, "<= 5 ms")]},
    "query_ryw_p99_ms": {"label": "query p99 with read-your-writes", "unit": "ms"},
    "query_ryw_with_append_p50_ms": {"label": "append + read-your-writes query p50",
                                     "unit": "ms"},
    "query_large_tasks": {"label": "tasks in the large projection (query_large_*)",
                          "unit": "tasks"},
}
# The same queries on a large projection (projection_live: query_large_*).
KNOWN |= {
    key.replace("query_", "query_large_", 1): {
        **meta, "label": f"{meta['label']}, large projection",
        **({"baseline": "projection.query_large_rr_p50_ms"} if "baseline" in meta else {})}
    for key, meta in list(KNOWN.items()) if key.startswith("query_") and key.endswith("_ms")}
# What a live batch took (projection_live: Projector.last_batch), beside its lag.
for _rate in ("1k", "10k"):
    KNOWN |= {
        f"lag_{_rate}_apply_p50_ms": {"label": f"batch apply p50 at {_rate} events/s (wall)",
                                      "unit": "ms"},
        f"lag_{_rate}_apply_p99_ms": {"label": f"batch apply p99 at {_rate} events/s (wall)",
                                      "unit": "ms"},
        f"lag_{_rate}_apply_cpu_p50_ms": {
            "label": f"batch apply p50 at {_rate} events/s, DuckDB thread CPU", "unit": "ms"},
        f"lag_{_rate}_apply_cpu_p99_ms": {
            "label": f"batch apply p99 at {_rate} events/s, DuckDB thread CPU", "unit": "ms"},
        f"lag_{_rate}_batch_events_p50": {"label": f"events per batch p50 at {_rate} events/s",
                                          "unit": "events"},
        f"lag_{_rate}_cpu_us_per_event": {
            "label": f"projector process CPU per event at {_rate} events/s", "unit": "us",
            "baseline": f"projection.lag_{_rate}_nats_py_cpu_us_per_event"},
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
