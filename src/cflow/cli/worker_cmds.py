"""`cfctl worker` (claim and run tasks) and `cfctl demo` (the guided tour)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cflow.cli.app import (
    EXIT_DOCKER,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    agent_name,
    app,
    emit,
    fail,
    interrupted,
    run,
    state,
)

if TYPE_CHECKING:
    from cflow.worker.executor import Executor


def _executor(
    *, exec_cmd: str | None, docker_image: str | None, docker_cmd: str | None,
    docker_network: bool, workspace: Path | None, cpus: float | None, memory: str | None,
    claude: bool, max_turns: int | None, max_budget_usd: float | None, timeout: float | None,
    claude_args: list[str],
) -> Executor:
    chosen = [x for x in (exec_cmd is not None, docker_image is not None, claude) if x]
    if len(chosen) != 1:
        fail("choose exactly one of --exec CMD, --docker IMAGE or --claude", EXIT_USAGE)
    if exec_cmd is not None:
        from cflow.worker.subprocess_exec import SubprocessExecutor

        return SubprocessExecutor(exec_cmd, timeout_s=timeout)
    if docker_image is not None:
        from cflow.worker.docker_exec import DockerExecutor

        return DockerExecutor(docker_image, command=docker_cmd, network=docker_network,
                              workspace=workspace, cpus=cpus, memory=memory, timeout_s=timeout)
    from cflow.worker.claude_exec import ClaudeExecutor

    return ClaudeExecutor(max_turns=max_turns, max_budget_usd=max_budget_usd, timeout_s=timeout,
                          extra_args=claude_args)


def _in_repo(executor: Executor, swarm: Any, repo: str | None, base: str,
             wip_every: float) -> Executor:
    """--repo: a worktree per claim (cflow.gitflow); else previous attempts' context only."""
    from cflow.gitflow.executor import GitExecutor, WithPrevious

    if repo is None:
        return WithPrevious(executor, swarm)
    return GitExecutor(executor, swarm, repo, base=base, wip_every_s=wip_every)


@app.command("worker")
def worker(
    ctx: typer.Context,
    name: str | None = typer.Option(None, "--name", help="Agent name (default: host-pid)."),
    capability: list[str] = typer.Option(
        [], "--capability", "-c", help="A capability this worker has (repeat or comma-separate)."),
    label: list[str] = typer.Option(
        [], "--label", help="KEY=VALUE label of the agent (repeatable)."),
    concurrency: int = typer.Option(1, "--concurrency", "-k", min=1, help="Tasks run in parallel."),
    lease_ttl: float | None = typer.Option(
        None, "--lease-ttl", min=0.6,
        help="Heartbeat at least every third of this many seconds (tasks carry their own TTL)."),
    exec_cmd: str | None = typer.Option(
        None, "--exec", help="Run each task as this shell command (task env, body on stdin)."),
    docker_image: str | None = typer.Option(
        None, "--docker", help="Run each task in a fresh container of this image."),
    docker_cmd: str | None = typer.Option(
        None, "--docker-cmd", help="Command in the container (default: the image's)."),
    docker_network: bool = typer.Option(
        False, "--docker-network", help="Give containers a network (default: none)."),
    workspace: Path | None = typer.Option(
        None, "--workspace", help="Directory mounted at /workspace in the container."),
    cpus: float | None = typer.Option(None, "--cpus", help="CPU limit per container."),
    memory: str | None = typer.Option(
        None, "--memory", help="Memory limit per container, e.g. 512m."),
    claude: bool = typer.Option(False, "--claude", help="Run each task with `claude -p`."),
    max_turns: int | None = typer.Option(None, "--max-turns", help="claude: max agentic turns."),
    max_budget_usd: float | None = typer.Option(
        None, "--max-budget-usd", help="claude: spending cap per task, USD."),
    claude_arg: list[str] = typer.Option(
        [], "--claude-arg", help="Extra argument passed to claude (repeatable)."),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Kill a task's process after this many seconds."),
    drain_grace: float = typer.Option(
        30.0, "--drain-grace", help="On SIGTERM, seconds running tasks get before release."),
    max_tasks: int | None = typer.Option(
        None, "--max-tasks", help="Drain and exit after claiming this many tasks."),
    claim_wait: float = typer.Option(30.0, "--claim-wait", hidden=True),
    repo: str | None = typer.Option(
        None, "--repo", help="Run each task in a fresh git worktree of this remote (dir or URL) "
        "on branch cflow/<task-id>; finished work is queued for `cfctl merge-queue`."),
    base: str = typer.Option("main", "--base", help="With --repo: the branch tasks start from."),
    wip_every: float = typer.Option(
        10.0, "--wip-every", min=0.2, help="With --repo: commit and push work in progress "
        "this often (seconds)."),
) -> None:
    """Claim tasks and run them (subprocess, Docker container or `claude -p`) until stopped.

    Ctrl-C stops at once: running tasks are stopped and released. SIGTERM
    drains: stop claiming, let running tasks finish within --drain-grace, then
    release them. Either way the last line is `interrupted: ...`, exit code 130.
    """
    c = state(ctx)
    from cflow.agents import capabilities_of

    executor = _executor(
        exec_cmd=exec_cmd, docker_image=docker_image, docker_cmd=docker_cmd,
        docker_network=docker_network, workspace=workspace, cpus=cpus, memory=memory,
        claude=claude, max_turns=max_turns, max_budget_usd=max_budget_usd, timeout=timeout,
        claude_args=claude_arg)
    labels = {}
    for item in label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--label wants KEY=VALUE, got {item!r}", EXIT_USAGE)
        labels[key] = value
    who = agent_name(name)
    quiet = c.json

    def show(kind: str, text: str) -> None:
        if not quiet and kind != "abort":  # after Ctrl-C the last line says what stopped
            sys.stderr.write(f"[{who}] {kind}: {text}\n")
            sys.stderr.flush()

    from cflow.errors import Unavailable

    try:  # fail fast: no claude binary, no Docker engine
        run(ctx, executor.check, reraise=(Unavailable,))
    except Unavailable as err:
        fail(str(err), EXIT_DOCKER if docker_image is not None else EXIT_UNAVAILABLE)

    async def body() -> dict[str, object]:
        from cflow.swarm import Swarm
        from cflow.worker.runtime import Worker, WorkerOptions

        async with Swarm.connect(c.url, swarm=c.swarm, agent=who) as swarm:
            runner = _in_repo(executor, swarm, repo, base, wip_every)
            w = Worker(swarm, runner, WorkerOptions(
                name=who, capabilities=capabilities_of(capability), labels=labels,
                concurrency=concurrency, url=c.url, lease_ttl_s=lease_ttl,
                drain_grace_s=drain_grace, max_tasks=max_tasks, claim_wait_s=claim_wait),
                on_event=show)
            import asyncio

            loop = asyncio.get_running_loop()

            def on_terminate() -> None:  # a supervisor stopping it: let the work finish
                signals.append(signal.SIGTERM)
                w.drain()

            def on_interrupt() -> None:  # a person wants it gone now
                signals.append(signal.SIGINT)
                w.abort()

            loop.add_signal_handler(signal.SIGTERM, on_terminate)
            loop.add_signal_handler(signal.SIGINT, on_interrupt)
            stats = await w.run()
            return {"agent": who, **stats.to_dict()}

    signals: list[signal.Signals] = []
    result = run(ctx, body)
    summary = (f"{result['completed']} completed, {result['failed']} failed, "
               f"{result['lost']} lost, {result['released']} released")
    if signals:
        if c.json:
            emit(ctx, {**result, "interrupted": True})
        how = "stopped" if signal.SIGINT in signals else "drained"
        interrupted(f"{how} worker {who} ({summary})")

    def human(d: dict[str, object]) -> None:
        sys.stderr.write(f"[{who}] stopped: {summary}\n")

    emit(ctx, result, human)


@app.command("demo")
def demo(
    ctx: typer.Context,
    agents: int = typer.Option(4, "--agents", "-n", min=1, max=32, help="Worker processes."),
    tasks: int = typer.Option(40, "--tasks", "-m", min=5, max=2000, help="Tasks in the DAG."),
    kill: bool = typer.Option(True, "--kill/--no-kill",
                              help="kill -9 one worker half-way to show reclaim."),
    lease_ttl: float = typer.Option(3.0, "--lease-ttl", min=1.0, help="Lease TTL of demo tasks."),
    work_s: float = typer.Option(1.5, "--work", help="Mean seconds one task works."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the task durations."),
    git: bool = typer.Option(
        False, "--git", help="Instead: agents in git worktrees of a generated repository, "
        "a few conflicting tasks, the merge queue, ending with the merged log."),
) -> None:
    """A guided tour: a task DAG drained by N real worker processes, one killed -9 half-way."""
    if git:
        _git_demo(ctx, agents)
        return
    from cflow.demo import DemoInterrupted, DemoOptions, run_demo

    c = state(ctx)
    opts = DemoOptions(agents=agents, tasks=tasks, kill=kill, lease_ttl_s=lease_ttl,
                       work_s=work_s, url=c.url, swarm=None, json=c.json, seed=seed)
    try:
        summary = run(ctx, lambda: run_demo(opts), reraise=(DemoInterrupted,))
    except DemoInterrupted as err:
        interrupted(str(err))
    if c.json:
        emit(ctx, summary)


def _git_demo(ctx: typer.Context, agents: int) -> None:
    from cflow.demo_git import GitDemoOptions, run_git_demo

    c = state(ctx)
    opts = GitDemoOptions(agents=agents, url=c.url, json=c.json)
    summary = run(ctx, lambda: run_git_demo(opts))
    if c.json:
        emit(ctx, summary)
