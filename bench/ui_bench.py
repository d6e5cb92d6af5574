"""Web console figures: first paint with 10,000 tasks, board update after an event.

``uv run python -m bench.ui_bench [--tasks 10000] [--updates 20] [--screenshots DIR]``

Starts its own nats-server, a projector process and a ``cfctl ui`` process, loads
``--tasks`` ready tasks (``bench.bulk``), then a few hundred through the facade
(claims, completions, failures, a gate, a 300-task DAG under one parent, agents),
and drives Debian's Chromium with Playwright:

* ``first_paint_board_ms``: navigation start -> first contentful paint of
  ``/board`` (the first page of 10,000+ tasks), median of 5 fresh tabs; also the
  last page and a text filter, and the server's answer time for ``/api/tasks``.
* ``board_update_ms``: a task is created through the facade; the browser records
  (MutationObserver, ``Date.now()``) when its row appears on the open board. The
  figure is that instant minus the instant before ``create()`` was called: the
  append, NATS pushing the event to the console, SSE to the page, the page's
  re-read of the projection at that sequence, and the DOM swap.
* ``first_paint_graph_ms``: ``/graph?parent=P`` with 300 tasks and their
  dependencies.

Nothing here is a test; the tests only check that the board updates live, with no bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bulk import load_tasks
from bench.servers import start_single
from cflow import events as ev
from cflow.swarm import Swarm
from cflow.ui.processes import cfctl, start_projector, start_ui, stop

CHROMIUM = os.environ.get("CFLOW_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SWARM = "uibench"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def seed(url: str, tasks: int) -> dict[str, Any]:
    async with Swarm.connect(url, swarm=SWARM, agent="bench-seeder") as s:
        started = time.perf_counter()
        await load_tasks(s, (ev.TaskCreated(
            title=f"bulk task {i:05d}", priority=i % 5,
            capabilities=("python",) if i % 3 else ("go",),
            labels={"area": ("core", "ui", "docs")[i % 3]}) for i in range(tasks)))
        loaded_s = time.perf_counter() - started
        gate = await s.tasks.create("release approval", kind="gate", priority=9)
        await s.tasks.create("publish", depends_on=[gate.task_id], priority=9)
        parent = await s.tasks.create("a 300-task plan", priority=8)
        ids: list[str] = []
        for i in range(300):
            deps = [ids[(i - 1) // 2]] if i else []
            if i % 9 == 0 and i > 10:
                deps.append(ids[i - 7])
            ids.append((await s.tasks.create(f"plan step {i:03d}", parent_id=parent.task_id,
                                             depends_on=deps, priority=7)).task_id)
    for n in range(3):  # a few agents with history
        async with Swarm.connect(url, swarm=SWARM, agent=f"worker-{n}") as w:
            agent = await w.agents.register(f"worker-{n}", ["python"])
            async with agent.present():
                for k in range(12):
                    lease = await w.tasks.claim(capabilities=["python"], wait=5)
                    if lease is None:
                        break
                    if k % 5 == 4:
                        await lease.fail("tests red: test_parser.py::test_unicode", retry=False)
                    elif k < 11:
                        await lease.complete(f"done by worker-{n}")
    return {"parent": parent.task_id, "loaded_s": loaded_s}


async def measure(url: str, console: str, login: str, parent: str, updates: int,
                  shots: Path | None) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    out: dict[str, Any] = {}
    profile = tempfile.mkdtemp(prefix="cflow-ui-bench-")
    async with async_playwright() as pw:
        ctx = await pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=ARGS, headless=True,
            viewport={"width": 1280, "height": 800})
        page = await ctx.new_page()
        await page.goto(login)
        await page.wait_for_selector("body[data-live=on]")

        async def paint(path: str, runs: int = 5) -> tuple[float, float]:
            fcp, response = [], []
            for _ in range(runs):
                tab = await ctx.new_page()
                await tab.goto(f"{console}{path}")
                await tab.wait_for_load_state("load")
                timing = await tab.evaluate("""() => new Promise(resolve => {
                    const nav = performance.getEntriesByType('navigation')[0];
                    new PerformanceObserver(list => {
                        const fcp = list.getEntriesByName('first-contentful-paint')[0];
                        if (fcp) resolve([fcp.startTime, nav.responseEnd - nav.requestStart]);
                    }).observe({type: 'paint', buffered: true});
                })""")
                fcp.append(timing[0])
                response.append(timing[1])
                await tab.close()
            return statistics.median(fcp), statistics.median(response)

        out["first_paint_board_ms"], out["board_response_ms"] = await paint("/board")
        last_page = (await (await page.request.get(f"{console}/api/tasks?size=50")).json())
        out["board_tasks"] = last_page["total"]
        out["first_paint_board_last_page_ms"], _ = await paint(f"/board?page={last_page['pages']}")
        out["first_paint_board_filtered_ms"], _ = await paint("/board?text=07&capability=go")
        api = []
        for _ in range(10):
            body = await (await page.request.get(f"{console}/api/tasks?size=50")).json()
            api.append(body["elapsed_ms"])
        out["api_tasks_page_ms_p50"] = statistics.median(api)
        out["first_paint_graph_ms"], out["graph_response_ms"] = await paint(
            f"/graph?parent={parent}", runs=3)
        # The whole swarm: the first 2,000 tasks of 10,000+ (the page says so).
        out["first_paint_graph_whole_swarm_ms"], out["graph_whole_swarm_response_ms"] = (
            await paint("/graph", runs=1))

        if shots is not None:  # before the live updates, which would fill the first page
            shots.mkdir(parents=True, exist_ok=True)
            await page.set_viewport_size({"width": 1200, "height": 640})
            await page.goto(f"{console}/board")
            await page.wait_for_selector("body[data-live=on]")
            await page.screenshot(path=str(shots / "ui-board.png"))
            await page.goto(f"{console}/graph?parent={parent}")
            await page.wait_for_selector("svg#dag g.node")
            await page.screenshot(path=str(shots / "ui-graph.png"))
            await page.set_viewport_size({"width": 1280, "height": 800})

        await page.goto(f"{console}/board")
        await page.wait_for_selector("body[data-live=on]")
        await page.evaluate("""() => {
            window.seen = {};
            new MutationObserver(() => {
                for (const row of document.querySelectorAll('tr[data-task]')) {
                    const id = row.dataset.task;
                    if (!(id in window.seen)) window.seen[id] = Date.now();
                }
            }).observe(document.body, {childList: true, subtree: true});
        }""")
        lat: list[float] = []
        async with Swarm.connect(url, swarm=SWARM, agent="bench-live") as s:
            for i in range(updates):
                sent = time.time() * 1000
                task = await s.tasks.create(f"live update {i}", priority=1000 + i)
                await page.wait_for_function(f"() => '{task.task_id}' in window.seen",
                                             timeout=10_000)
                shown = await page.evaluate(f"() => window.seen['{task.task_id}']")
                lat.append(shown - sent)
                await asyncio.sleep(0.2)  # one event at a time: each sample stands alone
        out["board_update_ms_p50"] = statistics.median(lat)
        out["board_update_ms_p95"] = pct(lat, 0.95)
        out["board_update_ms_max"] = max(lat)
        out["board_update_samples"] = len(lat)
        await ctx.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--screenshots", type=Path, default=None)
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="cflow-ui-bench-"))
    server = start_single(base, "default")
    procs: list[subprocess.Popen[str]] = []
    try:
        env = {**os.environ, "CFLOW_URL": server.url, "CFLOW_SWARM": SWARM,
               "XDG_DATA_HOME": str(base)}
        env.pop("CFLOW_UI_TOKEN", None)
        subprocess.run(cfctl("init"), env=env, check=True, capture_output=True)
        procs.append(start_projector(env, base, within=60))
        seeded = asyncio.run(seed(server.url, args.tasks))
        ui, info = start_ui(env, "--operator", "bench", within=60)
        procs.append(ui)
        figures = asyncio.run(measure(server.url, info["url"], info["login"], seeded["parent"],
                                      args.updates, args.screenshots))
        figures["bulk_load_s"] = round(seeded["loaded_s"], 2)
        figures["load_average"] = os.getloadavg()[0]
        for key, value in figures.items():
            shown = f"{value:,.1f}" if isinstance(value, float) else value
            print(f"{key:<34} {shown}")
        results = Path(__file__).parent / "results"
        results.mkdir(exist_ok=True)
        (results / "ui.json").write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        for proc in reversed(procs):
            stop(proc)
        server.stop()


if __name__ == "__main__":
    main()
