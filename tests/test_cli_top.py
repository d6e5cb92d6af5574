"""`cfctl top` when the server is gone, on an 80x24 terminal (pure)."""

from __future__ import annotations

from rich.console import Console

from cflow.cli.ops_cmds import LiveState, render_live
from cflow.metrics import MetricsFold


def _busy_state() -> LiveState:
    live = LiveState("s1", MetricsFold())
    for i in range(12):
        live.agents[f"agent-{i}"] = {"status": "busy", "task": f"task-{i}", "seen": 1_000}
    for i in range(8):
        live.recent.appendleft((1_000, "completed", f"a task with a long title {i}" * 2,
                                f"agent-{i}"))
    return live


def test_disconnected_is_shown_first_and_the_view_fits_80x24() -> None:
    live = _busy_state()
    live.contact(True, 1_000)
    live.contact(False, 31_000)
    snap = live.snapshot()
    assert snap["connected"] is False and snap["stale_s"] > 0
    console = Console(record=True, width=80, height=24)
    console.print(render_live(snap))
    lines = console.export_text().splitlines()
    assert "DISCONNECTED" in "\n".join(lines[:3])
    assert len(lines) <= 24, "\n".join(lines)
    assert all(len(line) <= 80 for line in lines)
    assert "more agents not shown" in "\n".join(lines)
