"""`bench --quick` runs end to end, so the benchmarks never rot. No thresholds:
only that every headline figure is in the JSON as a number (or says why not)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CFCTL = str(Path(sys.executable).parent / "cfctl")

SYNCS = ("always", "default")
LEVELS = (1, 4, 16)

HEADLINE = [
    "machine.fsync.rate",
    "machine.loopback.rtt_p50",
    "raw.core_publish.rate",
    "raw.request_reply.p50",
    *(f"raw.{s}.{k}" for s in SYNCS for k in (
        "js_publish.rate", "js_publish.p50", "js_publish_async.rate", "kv_create.rate",
        "kv_update.rate")),
    "pickup.sqlite.p50",
    "pickup.sqlite.p99",
    *(f"pickup.cflow.{s}.{q}" for s in SYNCS for q in ("p50", "p99")),
    *(f"claims.sqlite.{m}.n{n}.{k}" for m in ("strict", "default") for n in LEVELS
      for k in ("rate", "p50", "p99", "max", "double_claims", "conflicts", "locked")),
    *(f"claims.cflow.{s}.n{n}.{k}" for s in SYNCS for n in LEVELS
      for k in ("rate", "p50", "p99", "max", "double_claims", "conflicts")),
    *(f"claims.cflow.{s}.log_double_claims" for s in SYNCS),
    "reclaim.cflow.ratio_ttl.first",
    "reclaim.cflow.ratio_ttl.later",
    "reclaim.cflow.seconds",
    *(f"append.{w}.{s}.{k}" for s in SYNCS for w, k in (
        ("raw", "publish.rate"), ("cflow", "append.rate"), ("raw", "publish_async.rate"),
        ("cflow", "append_many.rate"))),
    "projection.ingest_events_per_s",
    "scale.idle.default.p99",
    "scale.load.default.p99",
    "scale.load.default.setup_s",
    "scale.load.default.writes_per_s",
    "scale.load.default.writes_during_claims",
    "scale.load.default.writes_offered",
    *(f"bigswarm.{k}.n{n}" for n in ("1k", "10k") for k in (
        "load_s", "joiner.first_claim", "joiner.rss", "swarm64.first_claim_p50",
        "swarm64.first_claim_max", "swarm64.rss", "contrast.board_rss")),
    *(f"mixed.{k}" for k in (
        "claims", "claims_per_s", "capability_violations", "starved_agents", "left_claimable",
        "double_claims", "inversions.same_set", "inversions.same_set_late",
        "inversions.covered", "inversions.covered_late", "cycle_ms", "arrivals.wait_p50",
        "arrivals.wait_max", "arrivals.bypassed")),
    *(f"mixed.agent.w{w}-{caps}" for w in (0, 1) for caps in ("any", "py", "gpu", "gpu+py")),
    "coldstart.python.ms",
    "coldstart.help.ms",
    "coldstart.task_add.ms",
    "coldstart.hook.ms",
    "cluster.r1.append.rate",
    "cluster.r3.append.rate",
    "cluster.r1.claim_complete.p50",
    "cluster.r3.claim_complete.p50",
    "mcp.tools_list.tokens",
]

# Figures that depend on parts other people build: "n/a" with a reason is allowed.
MAY_BE_NA = {"projection.ingest_events_per_s", "coldstart.hook.ms", "mcp.tools_list.tokens"}


def is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.integration
def test_bench_quick_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    md = tmp_path / "quick.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--markdown", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "CFLOW_BENCH_SMOKE": "1"},  # smaller projection sizes
    )
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}, result["errors"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    machine = result["machine"]
    assert is_number(machine["cpu_count"])
    for field in ("python", "nats_server", "duckdb", "sqlite"):
        assert machine[field]
    figures = result["figures"]
    missing = [k for k in HEADLINE if k not in figures]
    assert missing == []
    for key in HEADLINE:
        fig = figures[key]
        if fig["na"] is not None:
            assert key in MAY_BE_NA, f"{key}: n/a ({fig['na']})"
            continue
        assert is_number(fig["median"]), key
        assert is_number(fig["min"]) and is_number(fig["max"]), key
        assert fig["runs"], key
        if fig["baseline"]:
            assert is_number(fig["baseline_median"]), key
            assert is_number(fig["ratio"]), key
    for key in HEADLINE:  # every write figure says how durable it was
        if key.startswith(("claims.", "append.", "pickup.cflow", "raw.always", "raw.default")):
            assert figures[key]["durability"] not in ("", "n/a"), key
    assert "| figure |" in md.read_text()


@pytest.mark.integration
def test_cfctl_bench_runs_one_section(tmp_path: Path) -> None:
    out = tmp_path / "machine.json"
    proc = subprocess.run(
        [CFCTL, "bench", "--quick", "--only", "machine", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())["figures"]
    assert is_number(figures["machine.fsync.rate"]["median"])


# ----------------------------------------------------------- pure parts of the runner


def _bench_modules() -> tuple[object, object]:
    sys.path.insert(0, str(ROOT))
    try:
        from bench import cflow_bench, stats
    finally:
        sys.path.remove(str(ROOT))
    return cflow_bench, stats


def _swarm_bench() -> object:
    sys.path.insert(0, str(ROOT))
    try:
        from bench import swarm_bench
    finally:
        sys.path.remove(str(ROOT))
    return swarm_bench


def test_percentile_and_goals() -> None:
    _, stats = _bench_modules()
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5  # type: ignore[attr-defined]
    assert stats.percentile([5.0], 99) == 5.0  # type: ignore[attr-defined]
    assert math.isnan(stats.percentile([], 50))  # type: ignore[attr-defined]
    goal = stats.Goal("ratio", ">=", 2.0, ">= 2x")  # type: ignore[attr-defined]
    assert goal.met(10.0, 2.5) is True
    assert goal.met(10.0, 1.5) is False
    assert goal.met(10.0, None) is None
    rec = stats.Record()  # type: ignore[attr-defined]
    rec.add("base", 100.0, label="b", unit="ms", section="s", is_baseline=True)
    rec.add("x", 10.0, label="x", unit="ms", section="s", baseline="base")
    rec.add("x", 30.0, label="x", unit="ms", section="s", baseline="base")
    out = rec.to_json()
    assert out["x"]["median"] == 20.0
    assert (out["x"]["min"], out["x"]["max"]) == (10.0, 30.0)
    assert out["x"]["ratio"] == 0.2


def test_holder_violations_finds_a_double_claim() -> None:
    from cflow import events as ev
    from cflow.streams import StoredEvent

    cflow_bench, _ = _bench_modules()

    def stored(seq: int, data: ev.EventData, task: str = "t1") -> StoredEvent:
        event = ev.make_event(data, swarm="s", entity_id=task, hlc="0" * 32, actor="a")
        return StoredEvent(seq, f"cf.s.evt.task.{task}", event)

    created = ev.TaskCreated(title="x")
    claim = ev.TaskClaimed(owner="a", attempt=1, lease_ttl_s=30.0)
    fine = [stored(1, created), stored(2, claim), stored(3, ev.TaskCompleted(epoch=2))]
    assert cflow_bench.holder_violations(fine) == {  # type: ignore[attr-defined]
        "double_claims": 0, "double_completions": 0}
    bad = [stored(1, created), stored(2, claim), stored(3, claim),
           stored(4, ev.TaskCompleted(epoch=3)), stored(5, ev.TaskCompleted(epoch=3))]
    assert cflow_bench.holder_violations(bad) == {  # type: ignore[attr-defined]
        "double_claims": 1, "double_completions": 1}


def test_inversions_counts_a_lower_priority_claim_while_higher_work_waits() -> None:
    from cflow import events as ev
    from cflow.streams import StoredEvent

    swarm_bench = _swarm_bench()

    def stored(seq: int, data: ev.EventData, task: str, ms: int) -> StoredEvent:
        event = ev.make_event(data, swarm="s", entity_id=task, hlc="0" * 32, actor="a")
        return StoredEvent(seq, f"cf.s.evt.task.{task}", event, ms)

    def claim(owner: str) -> ev.TaskClaimed:
        return ev.TaskClaimed(owner=owner, attempt=1, lease_ttl_s=30.0)

    py, none = frozenset({"py"}), frozenset()
    tasks = {"lo": (none, 0), "hi": (none, 1), "hipy": (py, 2)}
    created = [stored(i + 1, ev.TaskCreated(title=t), t, 0) for i, t in enumerate(tasks)]
    # "lo" first while "hi" (same set) and "hipy" wait: "hi" is taken 10 ms later
    # (an offer in flight), "hipy" 5 s later (left behind), by "b" who covers it and
    # took "hi" first: one more inversion, a late one, of a covered set.
    items = [*created, stored(4, claim("plain"), "lo", 1000), stored(5, claim("b"), "hi", 1010),
             stored(6, claim("b"), "hipy", 6000)]
    caps = {"plain": none, "b": py}
    assert swarm_bench.inversions(items, tasks, caps) == {  # type: ignore[attr-defined]
        "same_set": 1, "covered": 2, "same_set_late": 0, "covered_late": 1}
    caps = {"plain": py, "b": py}  # now the first claimer could have taken "hipy" too
    assert swarm_bench.inversions(items, tasks, caps) == {  # type: ignore[attr-defined]
        "same_set": 1, "covered": 2, "same_set_late": 0, "covered_late": 2}
    in_order = [*created, stored(4, claim("b"), "hipy", 10), stored(5, claim("b"), "hi", 20),
                stored(6, claim("b"), "lo", 30)]
    assert swarm_bench.inversions(in_order, tasks, caps) == {  # type: ignore[attr-defined]
        "same_set": 0, "covered": 0, "same_set_late": 0, "covered_late": 0}
