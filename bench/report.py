"""The terminal table (rich), the JSON file and the markdown table of one run."""

from __future__ import annotations

import math
from typing import Any

from bench.stats import Figure, Record


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_ratio(r: float | None) -> str:
    if r is None or math.isnan(r):
        return ""
    return f"{r:.3g}x"


def goal_text(rec: Record, fig: Figure) -> str:
    ratio = rec.ratio(fig)
    parts = []
    for g in fig.goals:
        met = g.met(fig.median, ratio)
        mark = "?" if met is None else ("met" if met else "MISSED")
        parts.append(f"{g.text}: {mark}")
    return "; ".join(parts)


def rows(rec: Record) -> list[dict[str, str]]:
    out = []
    for fig in rec.figures.values():
        base = rec.figures.get(fig.baseline) if fig.baseline else None
        spread = fig.spread
        out.append({
            "section": fig.section,
            "figure": fig.label,
            "key": fig.key,
            "value": "n/a" if fig.na else f"{fmt(fig.median)} {fig.unit}".strip(),
            "spread": (f"{fmt(spread[0])}–{fmt(spread[1])} (n={len(fig.runs)})"
                       if spread else (fig.na or "")),
            "baseline": f"{fmt(base.median)} {base.unit}".strip() if base else "",
            "ratio": fmt_ratio(rec.ratio(fig)),
            "durability": fig.durability if fig.durability != "n/a" else "",
            "goal": goal_text(rec, fig),
        })
    return out


def print_table(rec: Record, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False, expand=False)
    for col in ("figure", "value", "spread", "baseline", "ratio", "durability", "goal"):
        table.add_column(col, overflow="fold")
    section = None
    for row in rows(rec):
        if row["section"] != section:
            section = row["section"]
            table.add_section()
            table.add_row(f"[bold]{section}[/bold]", "", "", "", "", "", "")
        style = "red" if "MISSED" in row["goal"] else None
        table.add_row(row["figure"], row["value"], row["spread"], row["baseline"],
                      row["ratio"], row["durability"], row["goal"], style=style)
    console = Console(width=200)
    console.print(table)
    for key, err in rec.errors.items():
        console.print(f"[red]section {key} failed:[/red] {err}")
    for note in rec.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


HEADLINE_PATTERNS = (
    "pickup.cflow.*.p50", "pickup.cflow.*.p99",
    "claims.cflow.*.n*.rate", "claims.cflow.*.n16.p99", "claims.cflow.*.n16.conflicts",
    "claims.cflow.*.log_double_claims",
    "reclaim.cflow.ratio_ttl.*",
    "append.cflow.*.append.rate", "append.cflow.*.append_many.rate",
    "projection.ingest_events_per_s", "projection.lag_p99_ms", "projection.rebuild_s",
    "projection.rebuild_events",
    "scale.load.*.p99", "scale.load.*.writes_per_s", "scale.load.*.writes_during_claims",
    "bigswarm.joiner.*", "bigswarm.swarm64.*",
    "mixed.capability_violations", "mixed.starved_agents", "mixed.left_claimable",
    "mixed.double_claims", "mixed.inversions.*", "mixed.arrivals.*",
    "coldstart.*.ms",
    "cluster.r3.*",
    "mcp.*",
)


def _table(rec: Record, keys: set[str] | None) -> list[str]:
    lines = [
        "| figure | value | spread | baseline | ratio | durability | goal |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    section = None
    for row in rows(rec):
        if keys is not None and row["key"] not in keys:
            continue
        if row["section"] != section:
            section = row["section"]
            lines.append(f"| **{section}** | | | | | | |")
        cells = [row[c].replace("|", "\\|") for c in
                 ("figure", "value", "spread", "baseline", "ratio", "durability", "goal")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def headline_keys(rec: Record) -> set[str]:
    from fnmatch import fnmatchcase

    return {k for k in rec.figures if any(fnmatchcase(k, p) for p in HEADLINE_PATTERNS)}


def markdown(rec: Record, meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        f"Command: `{meta['command']}` ({'quick' if meta['quick'] else 'full'} run, "
        f"{meta['duration_s']:.0f} s, {meta['started']})",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, "
        f"{m['platform']}, filesystem {m['filesystem']}; Python {m['python']}, "
        f"{m['nats_server']}, nats-py {m['nats_py']}, DuckDB {m['duckdb']}, "
        f"SQLite {m['sqlite']}. Load average (1 min) at start "
        f"{m.get('loadavg_start', [float('nan')])[0]:.1f}, at end "
        f"{m.get('loadavg_end', [float('nan')])[0]:.1f}.",
        "",
        "Each value is the median over repeated runs (spread = min–max); the ratio is "
        "value / baseline, both measured in the same run.",
        "",
        "Headline figures:",
        "",
        *_table(rec, headline_keys(rec)),
        "",
        "<details><summary>Every figure of the run</summary>",
        "",
        *_table(rec, None),
        "",
        "</details>",
    ]
    for key, err in rec.errors.items():
        lines.append(f"\nSection `{key}` failed: {err}")
    for note in rec.notes:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"
