"""``uv run python -m bench [--quick] [--only NAME] [--out FILE] [--markdown FILE]``

Starts its own nats-servers (one per sync setting, a 3-node cluster for the R3
figure) on free ports with temporary stores, runs the sections, prints a table
where every figure sits next to its same-run baseline, and writes every figure
plus the machine description as JSON. Every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import baselines, cflow_bench, interfaces, projection, swarm_bench
from bench.context import Ctx
from bench.procs import Children
from bench.report import markdown, print_table
from bench.servers import Servers, machine
from bench.stats import Record

SECTIONS: dict[str, Callable[[Ctx], Awaitable[None]]] = {
    "machine": baselines.machine,
    "raw": baselines.raw,
    "pickup": cflow_bench.pickup,
    "claims": cflow_bench.claims,
    "reclaim": cflow_bench.reclaim,
    "append": cflow_bench.append,
    "projection": projection.projection,
    "scale": cflow_bench.scale,
    "bigswarm": swarm_bench.bigswarm,
    "mixed": swarm_bench.mixed,
    "coldstart": interfaces.coldstart,
    "cluster": cflow_bench.cluster,
    "mcp": interfaces.mcp,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="short run (about 90 s), as in CI")
    p.add_argument("--only", action="append", choices=sorted(SECTIONS), metavar="NAME",
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    p.add_argument("--markdown", type=Path, default=None, help="also write a markdown table")
    return p.parse_args(argv)


async def run(ns: argparse.Namespace) -> dict[str, object]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="cflow-bench-", dir="/var/tmp"))
    servers = Servers(tmp)
    children = Children(tmp)
    rec = Record()
    ctx = Ctx(quick=ns.quick, tmp=tmp, servers=servers, children=children, rec=rec)
    names = ns.only or list(SECTIONS)
    timings: dict[str, float] = {}
    try:
        desc = machine(tmp)
        desc["loadavg_start"] = os.getloadavg()
        if desc["loadavg_start"][0] > (os.cpu_count() or 1):
            print(f"[bench] warning: load average {desc['loadavg_start'][0]:.1f} exceeds "
                  f"the {os.cpu_count()} CPUs; figures will be noisy", file=sys.stderr)
        for name in names:
            s0 = time.perf_counter()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                await SECTIONS[name](ctx)
            except Exception as exc:  # one failed section must not hide the rest
                rec.errors[name] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
            timings[name] = time.perf_counter() - s0
            print(f"[bench] {name} done in {timings[name]:.1f} s", file=sys.stderr, flush=True)
    finally:
        await children.close()
        servers.close()
        shutil.rmtree(tmp, ignore_errors=True)
    desc["loadavg_end"] = os.getloadavg()
    meta: dict[str, object] = {
        "command": "uv run python -m bench" + (" --quick" if ns.quick else "")
                   + "".join(f" --only {n}" for n in ns.only or []),
        "quick": ns.quick,
        "started": started,
        "duration_s": time.perf_counter() - t0,
        "section_seconds": timings,
        "machine": desc,
        "sync_settings": {
            "always": "nats-server jetstream { sync_interval: always }",
            "default": "nats-server default sync (2 min interval; acks before fsync)",
            "sqlite strict": "journal_mode=WAL, synchronous=FULL, BEGIN IMMEDIATE, timeout 5 s",
            "sqlite default": "journal_mode=WAL, synchronous=NORMAL, autocommit, timeout 5 s",
        },
    }
    return {**meta, "figures": rec.to_json(), "errors": rec.errors, "notes": rec.notes,
            "_record": rec}


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    result = asyncio.run(run(ns))
    rec = result.pop("_record")
    assert isinstance(rec, Record)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_table(rec, f"cflow benchmarks ({'quick' if ns.quick else 'full'})")
    if ns.markdown:
        ns.markdown.parent.mkdir(parents=True, exist_ok=True)
        ns.markdown.write_text(markdown(rec, result))
    print(f"results: {ns.out}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
