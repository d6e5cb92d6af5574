"""``uv run python -m bench.gitflow_bench [--tasks 20] [--workers 4]``: the git workflow's cost.

Figures, each beside a same-run baseline on the same machine:

- draining N tasks (each adds one file) with W workers in worktrees of a bare
  remote (take the branch, run, commit, fenced push, merge request), against the
  same N edits done by plain ``git`` in one clone (commit + push per branch);
- the merge queue merging those N branches (merge, fenced push, ``Merged``),
  against a plain ``git merge --no-ff`` + push of the same branches in a loop;
- reserved paths: N tasks that all declare one path, W workers: the handoff from
  one task's release of the path to the next task's claim (server timestamps),
  against the handoff from one completion to the next claim of N tasks without
  paths run by one worker (the claim path alone).

Starts its own nats-server on a free port with a temporary store; stops it and
removes every directory at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cflow.swarm import Swarm

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True,
                          capture_output=True, text=True).stdout.strip()


def make_remote(base: Path) -> Path:
    remote = base / "remote.git"
    git("init", "--quiet", "--bare", str(remote))
    git("symbolic-ref", "HEAD", "refs/heads/main", cwd=remote)
    seed = base / "seed"
    git("init", "--quiet", str(seed))
    (seed / "README").write_text("bench\n")
    git("add", "-A", cwd=seed)
    git("commit", "--quiet", "-m", "initial", cwd=seed)
    git("push", "--quiet", str(remote), "HEAD:refs/heads/main", cwd=seed)
    return remote


def plain_git(base: Path, tasks: int) -> tuple[float, float]:
    """Baseline: the same edits and merges with plain git in one clone (seconds each)."""
    remote = make_remote(base)
    clone = base / "clone"
    git("clone", "--quiet", str(remote), str(clone))
    started = time.monotonic()
    for i in range(tasks):
        git("checkout", "--quiet", "-b", f"b{i}", "origin/main", cwd=clone)
        (clone / f"f{i}.txt").write_text(f"{i}\n")
        git("add", "-A", cwd=clone)
        git("commit", "--quiet", "-m", f"f{i}", cwd=clone)
        git("push", "--quiet", "origin", f"b{i}", cwd=clone)
    edits = time.monotonic() - started
    git("checkout", "--quiet", "-B", "main", "origin/main", cwd=clone)
    started = time.monotonic()
    for i in range(tasks):
        git("fetch", "--quiet", "origin", cwd=clone)
        git("merge", "--quiet", "--no-ff", "--no-edit", f"origin/b{i}", cwd=clone)
        git("push", "--quiet", "origin", "main", cwd=clone)
    return edits, time.monotonic() - started


async def drain(url: str, swarm: Swarm, remote: Path, base: Path, ids: list[str],
                workers: int, cmd: str) -> float:
    """Seconds for ``workers`` git workers to complete the tasks ``ids``."""
    from cflow.gitflow.executor import GitExecutor
    from cflow.gitflow.worktrees import WorkArea
    from cflow.swarm import Swarm
    from cflow.worker.runtime import Worker, WorkerOptions
    from cflow.worker.subprocess_exec import SubprocessExecutor

    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        runs = []
        for w in range(workers):
            s = await stack.enter_async_context(
                Swarm.connect(url, swarm=swarm.name, agent=f"w{w}"))
            exe = GitExecutor(SubprocessExecutor(cmd), s, str(remote),
                              area=WorkArea(str(remote), base / "areas"))
            worker = Worker(s, exe, WorkerOptions(name=f"w{w}", claim_wait_s=1.0))
            runs.append((worker, asyncio.create_task(worker.run())))
        while not all(s == "completed" for s in [
                (await swarm.tasks.get(i)).status for i in ids]):
            await asyncio.sleep(0.05)
        drained = time.monotonic() - started
        for worker, _ in runs:
            worker.drain()
        await asyncio.gather(*(run for _, run in runs))
    return drained


async def cflow_run(url: str, base: Path, tasks: int, workers: int) -> tuple[float, float]:
    from cflow.gitflow.merger import Merger, read_queue
    from cflow.gitflow.worktrees import WorkArea
    from cflow.swarm import Swarm

    remote = make_remote(base)
    cmd = 'echo "$CFLOW_TASK_TITLE" > "$CFLOW_TASK_TITLE.txt"'
    async with Swarm.connect(url, swarm="gitbench", agent="bench") as swarm:
        ids = [(await swarm.tasks.create(f"f{i}")).task_id for i in range(tasks)]
        drained = await drain(url, swarm, remote, base, ids, workers, cmd)
        started = time.monotonic()
        merger = Merger(swarm, str(remote), area=WorkArea(str(remote), base / "merger"))
        await merger.run(until_idle=True)
        merged = time.monotonic() - started
        queue = await read_queue(swarm)
        assert sum(r.status == "merged" for r in queue.values()) == tasks
    return drained, merged


async def handoffs(url: str, base: Path, tasks: int, workers: int, *, paths: bool
                   ) -> list[float]:
    """Milliseconds from each task's end (its path released, else its completion) to the
    next task's claim, by the server's timestamps."""
    from cflow.streams import StoredEvent, names
    from cflow.swarm import Swarm

    remote = make_remote(base)
    name = "pathbench" if paths else "serialbench"
    async with Swarm.connect(url, swarm=name, agent="bench") as swarm:
        labels = {"paths": "shared.txt"} if paths else {}
        ids = [(await swarm.tasks.create(f"t{i}", labels=labels)).task_id
               for i in range(tasks)]
        await drain(url, swarm, remote, base, ids, workers,
                    'echo "$CFLOW_TASK_TITLE" > shared.txt')
        items = [i for i in await swarm.log.read(names.events_filter(name))
                 if isinstance(i, StoredEvent)]
    ends = sorted(i.time_ms for i in items if i.event.type == (
        "PathsReleased" if paths else "TaskCompleted"))
    claims = sorted(i.time_ms for i in items if i.event.type == "TaskClaimed")
    # with one path (or one worker) the runs are serial: claim k+1 follows end k
    return [float(claims[k + 1] - ends[k]) for k in range(min(len(ends), len(claims) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    from cflow.server import EmbeddedServer, ServerOptions, free_port

    base = Path(tempfile.mkdtemp(prefix="cflow-gitbench-"))
    server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=base / "nats",
                                          sync="default"))
    server.start()
    try:
        plain_edits, plain_merges = plain_git(base / "plain", args.tasks)
        drained, merged = asyncio.run(cflow_run(server.url, base / "cflow", args.tasks,
                                                args.workers))
        shared = asyncio.run(handoffs(server.url, base / "paths", args.tasks, args.workers,
                                      paths=True))
        serial = asyncio.run(handoffs(server.url, base / "serial", args.tasks, 1,
                                      paths=False))
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    n = args.tasks
    print(f"load average {os.getloadavg()[0]:.1f}; {n} tasks, {args.workers} workers")
    print(f"edits:  cflow worktrees {drained:6.2f} s ({drained / n * 1000:4.0f} ms/task, "
          f"{args.workers} in parallel)   plain git, one clone, serial {plain_edits:6.2f} s "
          f"({plain_edits / n * 1000:4.0f} ms/task)")
    print(f"merges: cflow merge queue  {merged:6.2f} s ({merged / n * 1000:4.0f} ms/merge)"
          f"                 plain git merge+push loop {plain_merges:6.2f} s "
          f"({plain_merges / n * 1000:4.0f} ms/merge)")
    print(f"paths:  {n} tasks on one path, {args.workers} workers: release -> next claim "
          f"median {statistics.median(shared):4.0f} ms, max {max(shared):4.0f} ms   "
          f"no paths, 1 worker: completion -> next claim median "
          f"{statistics.median(serial):4.0f} ms, max {max(serial):4.0f} ms")


if __name__ == "__main__":
    main()
