"""``cfctl demo --git``: coding agents on one repository, through worktrees and the merge queue.

What it shows, in some seconds:

1. a NATS server (the one at ``--url`` if reachable, else an embedded one);
2. a small generated repository: a bare remote with ``main`` holding ``app/VERSION``;
3. tasks whose body is a shell script: some add a file each, a few set the same
   line of ``app/VERSION`` (they conflict);
4. N ``cfctl worker --repo REMOTE --exec 'sh -s'`` processes (each task runs in
   its own worktree on ``cflow/<task-id>``) and one ``cfctl merge-queue`` whose
   check refuses conflict markers;
5. live lines as requests are merged or rejected (a rejected task comes back as
   a retry on top of the new ``main``, resolves the conflict and merges);
6. the merged log of ``main`` and the merge summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cflow.errors import CflowError

if TYPE_CHECKING:
    from cflow.server import EmbeddedServer
    from cflow.swarm import Swarm

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]
CHECK = "! grep -rqE '^(<<<<<<<|>>>>>>>) ' app"  # no conflict markers may reach main
VERSIONS = ("1.1-alpha", "1.1-beta", "1.1-rc1", "1.1-rc2", "1.1")


@dataclass
class GitDemoOptions:
    agents: int = 4
    tasks: int = 6  # tasks that each add their own file
    conflicts: int = 3  # tasks that set the same line
    url: str = "nats://127.0.0.1:4222"
    json: bool = False
    timeout_s: float = 180.0


def make_repository(base: Path) -> Path:
    """A bare remote whose main has app/VERSION and a README."""
    remote = base / "remote.git"
    seed = base / "seed"
    env = {**os.environ, "GIT_AUTHOR_NAME": "demo", "GIT_AUTHOR_EMAIL": "demo@localhost",
           "GIT_COMMITTER_NAME": "demo", "GIT_COMMITTER_EMAIL": "demo@localhost"}

    def git(*args: str, cwd: Path | None = None) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)

    git("init", "--quiet", "--bare", str(remote))
    git("symbolic-ref", "HEAD", "refs/heads/main", cwd=remote)
    git("init", "--quiet", str(seed))
    (seed / "app").mkdir()
    (seed / "app" / "VERSION").write_text('version = "1.0"\n')
    (seed / "README").write_text("A repository worked on by a cflow swarm.\n")
    git("add", "-A", cwd=seed)
    git("commit", "--quiet", "-m", "initial", cwd=seed)
    git("push", "--quiet", str(remote), "HEAD:refs/heads/main", cwd=seed)
    shutil.rmtree(seed)
    return remote


def task_scripts(tasks: int, conflicts: int) -> list[tuple[str, str]]:
    """(title, body script) of every task (pure)."""
    out = [(f"add feature {i}",
            f'sleep 0.3\nprintf "def feature_{i}():\\n    return {i}\\n" > app/feature_{i}.py\n')
           for i in range(1, tasks + 1)]
    for i in range(conflicts):
        version = VERSIONS[i % len(VERSIONS)]
        out.append((f"set version {version}",
                    f"sleep 0.3\nprintf 'version = \"{version}\"\\n' > app/VERSION\n"))
    return out


async def _merge_lines(swarm: Swarm, out: Any, titles: dict[str, str]) -> None:
    from cflow import events as ev
    from cflow.streams import StoredEvent, names

    async for item in swarm.log.follow(names.events_filter(swarm.name, "merge")):
        if not isinstance(item, StoredEvent):
            continue
        data = item.event.data
        title = titles.get(item.event.entity_id, item.event.entity_id)
        match data:
            case ev.MergeRequested():
                titles.setdefault(data.task_id, data.title)
                out.print(f"  queued    {data.title!r} ({data.branch} {data.head[:8]})")
            case ev.Merged():
                out.print(f"  [green]merged[/]    {title!r} -> main {data.commit[:8]}")
            case ev.MergeRejected():
                first = data.output.strip().splitlines()[0] if data.output.strip() else ""
                then = (f"retried as {data.retry_task[:8]}" if data.retry_task
                        else "no retry: the chain failed")
                out.print(f"  [yellow]rejected[/]  {title!r}: {first}; {then}")


async def _settled(swarm: Swarm) -> bool:
    from cflow.gitflow.merger import read_queue, settled

    return await settled(swarm, await read_queue(swarm))


def _start(agents: int, remote: Path, env: dict[str, str], log_path: Path
           ) -> list[subprocess.Popen[bytes]]:
    """N `cfctl worker --repo` processes and one `cfctl merge-queue`, logging to one file."""
    procs = []
    with open(log_path, "ab") as log:
        for i in range(agents):
            procs.append(subprocess.Popen(
                [*CFCTL, "worker", "--name", f"demo-gw{i}", "--repo", str(remote),
                 "--exec", "sh -s", "--wip-every", "2"],
                env=env, stdout=subprocess.DEVNULL, stderr=log))
        procs.append(subprocess.Popen(
            [*CFCTL, "merge-queue", "--name", "demo-merger", "--repo", str(remote),
             "--check", CHECK, "--lease-ttl", "5"],
            env=env, stdout=subprocess.DEVNULL, stderr=log))
    return procs


def _merged_log(remote: Path) -> tuple[str, str]:
    """main's first-parent log (one merge per task) and its app/VERSION."""
    graph = subprocess.run(["git", "log", "--first-parent", "--format=%h %s", "main"],
                           cwd=remote, capture_output=True, text=True, check=True).stdout
    version = subprocess.run(["git", "show", "main:app/VERSION"], cwd=remote,
                             capture_output=True, text=True, check=True).stdout.strip()
    return graph, version


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_git_demo(opts: GitDemoOptions) -> dict[str, Any]:
    """Run the demo; returns the merge summary plus the merged log.

    Raises:
        GitError: git is not installed.
        Unavailable: no server reachable and none could be started.
        CflowError: the swarm did not settle within ``opts.timeout_s``.
    """
    from rich.console import Console

    from cflow.demo import embedded_server, reachable
    from cflow.gitflow.git import require_git
    from cflow.gitflow.merger import read_queue
    from cflow.gitflow.report import merge_summary
    from cflow.streams import StoredEvent, names
    from cflow.swarm import Swarm

    require_git()
    out = Console(stderr=opts.json)
    server: EmbeddedServer | None = None
    server_dir: Path | None = None
    work = Path(tempfile.mkdtemp(prefix="cflow-demo-git-"))
    procs: list[subprocess.Popen[bytes]] = []
    url = opts.url
    started = time.monotonic()
    try:
        if not await reachable(url):
            launched, server_dir = embedded_server()
            await asyncio.to_thread(launched.start, detach=True)
            server, url = launched, launched.url
            out.print(f"started an embedded nats-server at {url}")
        remote = await asyncio.to_thread(make_repository, work)
        name = f"demo-git-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "CFLOW_URL": url, "CFLOW_SWARM": name,
               "XDG_DATA_HOME": str(work / "data")}
        scripts = task_scripts(opts.tasks, opts.conflicts)
        out.print(f"repository {remote} (main: app/VERSION); swarm [bold]{name}[/]: "
                  f"{len(scripts)} tasks ({opts.conflicts} set the same line), "
                  f"{opts.agents} workers in worktrees, 1 merge queue (check: {CHECK})")
        async with Swarm.connect(url, swarm=name, agent="demo") as swarm:
            titles: dict[str, str] = {}
            for title, body in scripts:
                task = await swarm.tasks.create(title, body=body, lease_ttl_s=10.0,
                                                backoff_initial_s=0.2)
                titles[task.task_id] = title
            procs.extend(_start(opts.agents, remote, env, work / "processes.log"))
            lines = asyncio.create_task(_merge_lines(swarm, out, titles))
            try:
                async with asyncio.timeout(opts.timeout_s):
                    # Settled only ever after a merge verdict (completions precede merges).
                    async for item in swarm.log.follow(names.events_filter(name, "merge")):
                        if isinstance(item, StoredEvent) and item.event.type in (
                                "Merged", "MergeRejected") and await _settled(swarm):
                            break
            except TimeoutError:
                raise CflowError(f"the demo did not settle within {opts.timeout_s:g} s "
                                 f"(logs: {work / 'processes.log'})") from None
            finally:
                await asyncio.to_thread(_stop, procs)
                lines.cancel()
                with contextlib.suppress(asyncio.CancelledError, CflowError):
                    await lines
            summary = merge_summary((await read_queue(swarm)).values())
        graph, version = await asyncio.to_thread(_merged_log, remote)
        out.print("\n[bold]merged log of main[/]")
        out.print(graph.rstrip(), markup=False, highlight=False)
        out.print(f"\n{summary['merged']} merged, {summary['rejected']} rejected "
                  f"({summary['causes']}), rejection rate {summary['rejection_rate']}, "
                  f"lead time median {summary['lead_time_median_s']} s, max "
                  f"{summary['lead_time_max_s']} s; main's app/VERSION: {version}; "
                  f"{time.monotonic() - started:.1f} s")
        return {**summary, "swarm": name, "log": graph.splitlines(), "version": version}
    finally:
        if procs:
            await asyncio.to_thread(_stop, procs)
        if server is not None:
            await asyncio.to_thread(server.stop)
        for d in (server_dir, work):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)


__all__ = ["GitDemoOptions", "make_repository", "run_git_demo", "task_scripts"]
