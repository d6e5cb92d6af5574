"""The worker runtime and the subprocess executor.

Executor tests need no server; runtime tests run a real nats-server and real
child processes (in-process ``Worker`` objects and ``cfctl worker`` subprocesses).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cflow import events as ev
from cflow.streams import StoredEvent, names
from cflow.swarm import Swarm
from cflow.tasks import TaskState
from cflow.worker import RESULT_CAP_BYTES, Outcome, TaskContext, Worker, WorkerOptions
from cflow.worker.claude_exec import (
    ClaudeExecutor,
    ClaudeNotInstalled,
    claude_argv,
    final_result,
)
from cflow.worker.subprocess_exec import SubprocessExecutor
from support import maintained, until

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


def ctx(body: str = "hello", **kw: object) -> TaskContext:
    base: dict[str, object] = {"task_id": "t1", "title": "the title", "body": body,
                               "attempt": 1, "epoch": 7, "url": "nats://x", "swarm": "s",
                               "agent": "w"}
    base.update(kw)
    return TaskContext(**base)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return False


async def wait_file(path: Path, within: float = 10.0) -> str:
    """Wait for a child process to write a file (no event to await across processes)."""
    async with asyncio.timeout(within):
        while not path.exists() or not path.read_text().strip():
            await asyncio.sleep(0.02)
    return path.read_text()


# ------------------------------------------------------------------ executor


async def test_exec_success_env_and_stdin() -> None:
    exe = SubprocessExecutor(
        'echo "$CFLOW_TASK_ID $CFLOW_TASK_TITLE $CFLOW_TASK_ATTEMPT $CFLOW_EPOCH '
        '$CFLOW_SWARM $CFLOW_URL"; cat; echo; printf "%s" "$CFLOW_TASK_BODY"')
    out = await exe.run(ctx(body="from stdin"))
    assert out.ok and out.exit_code == 0
    assert out.result == "t1 the title 1 7 s nats://x\nfrom stdin\nfrom stdin"


async def test_exec_failure_reports_stderr_tail() -> None:
    exe = SubprocessExecutor("echo partial; for i in $(seq 1 2000); do echo line$i >&2; done; "
                             "exit 3")
    out = await exe.run(ctx())
    assert not out.ok and out.exit_code == 3
    assert out.error is not None and out.error.startswith("exit code 3: ")
    assert out.error.endswith("line2000") and "line1\n" not in out.error
    assert len(out.error) < 2200


async def test_exec_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    exe = SubprocessExecutor(f"sleep 30 & echo $! > {pidfile}; wait", timeout_s=0.5,
                             kill_grace_s=0.5)
    out = await exe.run(ctx())
    assert not out.ok and out.error == "timed out after 0.5 s"
    assert not alive(int(pidfile.read_text()))


async def test_exec_cancel_mid_run_leaves_no_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    exe = SubprocessExecutor(f"sleep 30 & echo $$ $! > {pidfile}; wait", kill_grace_s=0.5)
    run = asyncio.create_task(exe.run(ctx()))
    pids = [int(p) for p in (await wait_file(pidfile)).split()]
    assert all(alive(p) for p in pids)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert not exe.pids
    # The group got SIGKILL before the run ended; a loaded kernel may take a moment to
    # finish the background child off (a kill is no event we can await).
    deadline = time.monotonic() + 2.0
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if alive(p)]
        await asyncio.sleep(0.01)


async def test_exec_sigterm_ignored_gets_sigkill(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    exe = SubprocessExecutor(f"trap '' TERM; echo $$ > {pidfile}; sleep 30 & wait",
                             kill_grace_s=0.3)
    run = asyncio.create_task(exe.run(ctx()))
    pid = int(await wait_file(pidfile))
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert not alive(pid)


async def test_exec_output_cap() -> None:
    exe = SubprocessExecutor("head -c 40000 /dev/zero | tr '\\0' x")
    out = await exe.run(ctx())
    assert out.ok and out.truncated and len(out.output) == 40000
    assert len(out.result) == RESULT_CAP_BYTES
    small = await SubprocessExecutor("echo -n ok").run(ctx())
    assert not small.truncated and small.result == "ok"


# -------------------------------------------------------------------- claude


def test_claude_argv_and_result_parsing() -> None:
    argv = claude_argv("claude", "do it", max_turns=3, max_budget_usd=0.5, extra_args=["--x"])
    assert argv == ["claude", "-p", "do it", "--output-format", "stream-json", "--verbose",
                    "--max-turns", "3", "--max-budget-usd", "0.5", "--x"]
    stream = (b'{"type":"system","subtype":"init"}\nnot json\n'
              b'{"type":"result","subtype":"success","is_error":false,"result":"done",'
              b'"total_cost_usd":0.0123}\n')
    assert final_result(stream) == {"type": "result", "subtype": "success", "is_error": False,
                                    "result": "done", "total_cost_usd": 0.0123}
    assert final_result(b"") is None


async def test_claude_missing_binary_fails_at_check() -> None:
    exe = ClaudeExecutor(binary="claude-definitely-not-installed")
    with pytest.raises(ClaudeNotInstalled, match="not found on PATH"):
        await exe.check()


async def test_claude_executor_with_a_fake_claude(tmp_path: Path) -> None:
    fake = tmp_path / "claude"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "{\\"type\\":\\"system\\",\\"args\\":\\"$*\\"}"\n'
        'echo "{\\"type\\":\\"result\\",\\"subtype\\":\\"success\\",\\"is_error\\":false,'
        '\\"result\\":\\"answer for $CFLOW_TASK_ID\\",\\"total_cost_usd\\":0.25}"\n')
    fake.chmod(0o755)
    exe = ClaudeExecutor(binary=str(fake), max_turns=2)
    await exe.check()
    out = await exe.run(ctx())
    assert out.ok and out.result == "answer for t1" and out.cost_usd == 0.25
    assert b"--max-turns 2" in out.output and b"--output-format stream-json" in out.output

    fake.write_text(
        "#!/bin/sh\n"
        'echo "{\\"type\\":\\"result\\",\\"subtype\\":\\"error_max_turns\\",\\"is_error\\":true,'
        '\\"total_cost_usd\\":0.5}"\nexit 1\n')
    out = await exe.run(ctx())
    assert not out.ok and out.cost_usd == 0.5
    assert out.error is not None and out.error.startswith("claude error_max_turns")


# -------------------------------------------------------------- the runtime


async def task_events(swarm: Swarm, task_id: str) -> list[ev.Event]:
    return [i.event for i in await swarm.tasks.history(task_id)]


@contextlib.asynccontextmanager
async def running_worker(nats_url: str, swarm_name: str, executor: object, name: str = "w1",
                         on_event: Any = None, **opts: object) -> AsyncIterator[Worker]:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent=name) as s:
        w = Worker(s, executor, WorkerOptions(name=name, url=nats_url, **opts),  # type: ignore[arg-type]
                   on_event=on_event)
        run = asyncio.create_task(w.run())
        try:
            await asyncio.wait_for(w.started.wait(), 10)
            yield w
        finally:
            w.drain()
            try:
                await asyncio.wait_for(run, 20)
            finally:
                if not run.done():
                    run.cancel()


@pytest.mark.integration
async def test_worker_completes_and_records_status(
        swarm: Swarm, nats_url: str, swarm_name: str) -> None:
    exe = SubprocessExecutor('echo "did $CFLOW_TASK_TITLE"')
    async with running_worker(nats_url, swarm_name, exe, capabilities=("py",)) as w:
        a = await swarm.tasks.create("a", capabilities=["py"], priority=1)
        b = await swarm.tasks.create("b", depends_on=[a.task_id])
        done = await until(swarm, b.task_id, lambda s: s.status == "completed")
        assert done.result == "did b\n" and done.owner == "w1"
        assert (await swarm.tasks.get(a.task_id)).result == "did a\n"
    assert w.stats.completed == 2 and w.stats.claimed == 2
    info = await swarm.agents.get("w1")
    assert info.status == "offline" and info.deregistered and info.labels == {"executor": "exec"}
    statuses = [e.data.status for e in [i.event for i in await swarm.log.read(
        names.event_subject(swarm_name, "agent", "w1")) if isinstance(i, StoredEvent)]
        if isinstance(e.data, ev.AgentStatusChanged)]
    assert "busy" in statuses and "idle" in statuses


@pytest.mark.integration
async def test_worker_failure_is_retried_then_completes(
        swarm: Swarm, nats_url: str, swarm_name: str) -> None:
    exe = SubprocessExecutor('if [ "$CFLOW_TASK_ATTEMPT" = 1 ]; then echo boom >&2; exit 2; fi; '
                             'echo "ok on $CFLOW_TASK_ATTEMPT"')
    async with running_worker(nats_url, swarm_name, exe):
        t = await swarm.tasks.create("flaky", max_attempts=3, backoff_initial_s=0.1)
        done = await until(swarm, t.task_id, lambda s: s.status == "completed")
    assert done.attempt == 2 and done.result == "ok on 2\n"
    failed = [e.data for e in await task_events(swarm, t.task_id)
              if isinstance(e.data, ev.TaskFailed)]
    assert len(failed) == 1 and failed[0].error == "exit code 2: boom" and not failed[0].final


@pytest.mark.integration
async def test_worker_final_failure_after_max_attempts(
        swarm: Swarm, nats_url: str, swarm_name: str) -> None:
    async with running_worker(nats_url, swarm_name, SubprocessExecutor("exit 1")):
        t = await swarm.tasks.create("hopeless", max_attempts=2, backoff_initial_s=0.1)
        done = await until(swarm, t.task_id, lambda s: s.status == "failed")
    assert done.attempt == 2 and done.error == "exit code 1"


@pytest.mark.integration
async def test_worker_keeps_full_output_when_capped(
        swarm: Swarm, nats_url: str, swarm_name: str) -> None:
    exe = SubprocessExecutor("head -c 20000 /dev/zero | tr '\\0' y")
    async with running_worker(nats_url, swarm_name, exe):
        t = await swarm.tasks.create("big output")
        await until(swarm, t.task_id, lambda s: s.status == "completed")
    completed = next(e.data for e in await task_events(swarm, t.task_id)
                     if isinstance(e.data, ev.TaskCompleted))
    assert completed.result is not None and len(completed.result) == RESULT_CAP_BYTES
    assert completed.output_ref is not None and completed.output_ref.startswith("note:")
    note = await swarm.log.get(int(completed.output_ref.split(":")[1]))
    assert isinstance(note, StoredEvent) and isinstance(note.event.data, ev.TaskNoted)
    assert note.event.data.artifact == "output" and note.event.data.text == "y" * 20000


@pytest.mark.integration
async def test_cancelling_a_task_kills_its_process(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    exe = SubprocessExecutor(f"echo $$ > {pidfile}; sleep 60", kill_grace_s=0.5)
    async with running_worker(nats_url, swarm_name, exe) as w:
        t = await swarm.tasks.create("long", lease_ttl_s=1.5)
        pid = int(await wait_file(pidfile))
        await swarm.tasks.cancel(t.task_id, "changed my mind")
        async with asyncio.timeout(10):
            while w.running:  # the worker's own bookkeeping; it has no event of its own
                await asyncio.sleep(0.05)
        assert not alive(pid)
    assert w.stats.lost == 1 and w.stats.completed == 0
    assert (await swarm.tasks.get(t.task_id)).status == "cancelled"


# ------------------------------------------------- cfctl worker subprocesses


def start_worker(cli_env: dict[str, str], *args: str, name: str = "w1") -> subprocess.Popen[bytes]:
    """A `cfctl worker` subprocess; its stderr goes to <XDG_DATA_HOME>/<name>.log."""
    log = Path(cli_env["XDG_DATA_HOME"]) / f"{name}.log"
    with open(log, "ab") as out:
        return subprocess.Popen([*CFCTL, "worker", "--name", name, *args], env=cli_env,
                                stdout=subprocess.DEVNULL, stderr=out)


def worker_log(cli_env: dict[str, str], name: str = "w1") -> str:
    return (Path(cli_env["XDG_DATA_HOME"]) / f"{name}.log").read_text()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


async def until_claimed(swarm: Swarm, task_id: str, owner: str | None = None) -> TaskState:
    return await until(swarm, task_id, lambda s: s.status == "claimed"
                       and (owner is None or s.owner == owner))


@pytest.mark.integration
async def test_a_claim_cancelled_as_a_nats_reply_arrives_stops_at_once(swarm: Swarm) -> None:
    """The drain hang: a worker draining cancels its waiting claim; a cancel landing in
    the loop iteration of one of the claim's NATS replies was swallowed (Python 3.11's
    wait_for in nats-py), and the claim waited out its whole wait (30 s by default,
    the tests gave a drain 20). Each claim here is cancelled on its n-th reply."""
    await swarm.tasks.ensure_board()
    nc: Any = swarm.nc
    prefix = bytes(nc._resp_sub_prefix).decode()
    replies = next(sub for sub in nc._subs.values() if sub._subject.startswith(prefix))
    handler = replies._cb
    at = {"reply": 0, "cancel_on": 0}
    claims: list[asyncio.Task[object]] = []

    async def cancel_on_reply(msg: object) -> None:
        await handler(msg)
        at["reply"] += 1
        if at["reply"] == at["cancel_on"]:
            claims[-1].cancel()

    replies._cb = cancel_on_reply
    try:
        # How many replies a claim gets before it settles into waiting for a pushed offer.
        at.update(reply=0, cancel_on=0)
        assert await swarm.tasks.claim(agent="w1", capabilities=(), wait=0) is None
        looked = at["reply"]
        assert looked >= 2
        for n in range(1, looked + 1):
            at.update(reply=0, cancel_on=n)
            claims.append(asyncio.create_task(
                swarm.tasks.claim(agent="w1", capabilities=(), wait=20)))
            done, _ = await asyncio.wait({claims[-1]}, timeout=5)
            assert claims[-1] in done and claims[-1].cancelled(), (n, claims[-1])
    finally:
        replies._cb = handler
        for claim in claims:
            claim.cancel()


@pytest.mark.integration
async def test_sigterm_drains_and_releases(
        swarm: Swarm, cli_env: dict[str, str], tmp_path: Path) -> None:
    started = tmp_path / "started"
    t1 = await swarm.tasks.create("quick-ish", lease_ttl_s=5)
    t2 = await swarm.tasks.create("slow", lease_ttl_s=5)
    cmd = (f'echo $CFLOW_TASK_TITLE >> {started}; '
           f'if [ "$CFLOW_TASK_TITLE" = slow ]; then sleep 60; else sleep 0.5; fi; echo done')
    proc = start_worker(cli_env, "--exec", cmd, "--concurrency", "2", "--drain-grace", "2")
    try:
        await until_claimed(swarm, t1.task_id)
        await until_claimed(swarm, t2.task_id)
        await wait_file(started)
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 20)
        err = worker_log(cli_env)
        assert rc == 130, err
        assert "draining" in err
        assert err.strip().splitlines()[-1].startswith("interrupted: drained worker w1 (")
    finally:
        stop(proc)
    print(worker_log(cli_env))
    quick = await swarm.tasks.get(t1.task_id)
    slow = await swarm.tasks.get(t2.task_id)
    assert quick.status == "completed"  # finished within the grace period
    assert slow.status == "ready" and slow.attempt == 0  # released, the attempt not counted
    types = [e.type for e in await task_events(swarm, t2.task_id)]
    assert types[-1] == "TaskReleased"
    info = await swarm.agents.get("w1")
    assert info.status == "offline" and info.deregistered


@pytest.mark.integration
async def test_second_sigint_stops_at_once_and_releases(
        swarm: Swarm, cli_env: dict[str, str]) -> None:
    t = await swarm.tasks.create("slow", lease_ttl_s=5)
    proc = start_worker(cli_env, "--exec", "sleep 60", "--drain-grace", "60")
    try:
        await until_claimed(swarm, t.task_id)
        proc.send_signal(signal.SIGINT)
        await asyncio.sleep(0.3)  # two distinct presses
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 15)
    finally:
        stop(proc)
    state = await swarm.tasks.get(t.task_id)
    assert state.status == "ready"
    assert [e.type for e in await task_events(swarm, t.task_id)][-1] == "TaskReleased"


@pytest.mark.integration
async def test_worker_killed_9_is_reclaimed_after_ttl(
        swarm: Swarm, cli_env: dict[str, str], nats_url: str, swarm_name: str,
        tmp_path: Path) -> None:
    t = await swarm.tasks.create("survivor", lease_ttl_s=2, max_attempts=3,
                                 backoff_initial_s=0.1)
    pidfile = tmp_path / "pid"
    proc = start_worker(cli_env, "--exec",
                        f'if [ "$CFLOW_TASK_ATTEMPT" = 1 ]; then echo $$ > {pidfile}; sleep 60; '
                        'fi; echo second', name="victim")
    try:
        await until_claimed(swarm, t.task_id, "victim")
        child = int(await wait_file(pidfile))
        proc.kill()
        proc.wait(10)
        # The task's shell dies with its worker (parent-death signal)...
        async with asyncio.timeout(5):
            while alive(child):
                await asyncio.sleep(0.02)  # another process's death: nothing to await
        # ...its background children do not; clean them up.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signal.SIGKILL)
        async with running_worker(nats_url, swarm_name, SubprocessExecutor("echo rescued"),
                                  name="rescuer"):
            done = await until(swarm, t.task_id, lambda s: s.status == "completed", within=20)
    finally:
        stop(proc)
    assert done.owner == "rescuer" and done.attempt == 2 and done.result == "rescued\n"
    types = [e.type for e in await task_events(swarm, t.task_id)]
    assert types.count("TaskLeaseExpired") == 1 and types.count("TaskCompleted") == 1


@pytest.mark.integration
async def test_claude_worker_fails_fast_without_claude(cli_env: dict[str, str]) -> None:
    env = dict(cli_env, PATH="/nonexistent")
    proc = subprocess.run([*CFCTL, "worker", "--claude"], env=env, capture_output=True,
                          timeout=30, check=False)
    err = proc.stderr.decode().strip()
    assert proc.returncode != 0
    assert len(err.splitlines()) == 1 and "`claude` not found on PATH" in err


class BrokenExecutor:
    name = "broken"

    async def check(self) -> None:
        return None

    async def run(self, ctx: TaskContext) -> object:
        raise OSError("cannot start anything")


@pytest.mark.integration
async def test_executor_error_fails_the_attempt_and_the_worker_goes_on(
        swarm: Swarm, nats_url: str, swarm_name: str) -> None:
    async with running_worker(nats_url, swarm_name, BrokenExecutor()) as w:
        t = await swarm.tasks.create("doomed", max_attempts=1)
        done = await until(swarm, t.task_id, lambda s: s.status == "failed")
        assert not w.draining.is_set()
    assert done.error == "broken executor: cannot start anything"


class CountingExecutor:
    """Counts the attempts it was asked to run; each succeeds at once."""

    name = "counting"

    def __init__(self) -> None:
        self.runs = 0

    async def check(self) -> None:
        return None

    async def run(self, ctx: TaskContext) -> Outcome:
        self.runs += 1
        return Outcome(ok=True, output=b"ran")


@pytest.mark.integration
async def test_a_claim_past_its_holders_deadline_is_not_started(swarm: Swarm) -> None:
    """A claim that comes back after the holder's deadline (a slow or retried claim
    write, a paused process) is counted lost and its work never started: another
    holder may have the task by then."""
    t = await swarm.tasks.create("claimed too late", lease_ttl_s=1.0)
    lease = await swarm.tasks.claim(t.task_id, agent="late")
    assert lease is not None
    await asyncio.sleep(max(0.0, lease.deadline - time.monotonic()) + 0.01)  # time itself
    exe = CountingExecutor()
    w = Worker(swarm, exe, WorkerOptions(name="late"))
    await w._run_one(lease)
    assert (exe.runs, w.stats.lost, w.stats.completed) == (0, 1, 0)
    # Given back at once, not left to expire; the attempt it never ran is not counted.
    back = await swarm.tasks.get(t.task_id)
    assert (back.status, back.attempt) == ("ready", 0), back
    assert [type(e.data).__name__ for e in await task_events(swarm, t.task_id)][-1] == \
        "TaskReleased"


@pytest.mark.integration
async def test_a_result_written_through_an_outage_keeps_its_lease(
        swarm: Swarm, nats_url: str, swarm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The events stream stalls (an election) while the holder writes its result, for
    longer than the lease's TTL plus the reap margin; its leases stream answers. The
    holder keeps renewing while it writes, so the finished work is recorded once
    rather than refused and run again."""
    exe = CountingExecutor()
    async with running_worker(nats_url, swarm_name, exe, name="slow-writer") as w:
        append = w.swarm.log.append
        stalled: list[str] = []

        async def stall_first_completion(data: ev.EventData, *args: Any, **kwargs: Any) -> Any:
            if isinstance(data, ev.TaskCompleted) and not stalled:
                stalled.append(args[0])
                await asyncio.sleep(5.0)  # TTL 2 s + reap margin 2 s, and some
            return await append(data, *args, **kwargs)

        monkeypatch.setattr(w.swarm.log, "append", stall_first_completion)
        t = await swarm.tasks.create("result through an outage", lease_ttl_s=2)
        async with maintained(nats_url, swarm_name):  # another reaper, watching
            done = await until(swarm, t.task_id, lambda s: s.status == "completed", within=20)
    assert stalled == [t.task_id]
    assert (exe.runs, done.attempt, w.stats.completed, w.stats.lost) == (1, 1, 1, 0)


class UntilStopped:
    """Works until it is stopped (ignores the task's timeout, as an agent session
    would); records when it stopped and how long it ran."""

    name = "until-stopped"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()
        self.stopped_at: float | None = None
        self.ran_s: float | None = None

    async def check(self) -> None:
        return None

    async def run(self, ctx: TaskContext) -> Outcome:
        began = time.monotonic()
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.stopped_at = time.monotonic()
            self.ran_s = self.stopped_at - began
            self.stopped.set()
        raise AssertionError("unreachable")


@pytest.mark.integration
async def test_the_holder_stops_before_its_start_to_close_timeout_expires_the_claim(
        swarm: Swarm, nats_url: str, swarm_name: str) -> None:
    """Reapers expire a claim start-to-close after it was stored and requeue it, however
    its lease is renewed: the holder must have stopped by then, not at its next renewal
    (the lease's own TTL is long here)."""
    exe = UntilStopped()
    async with running_worker(nats_url, swarm_name, exe, name="bounded") as w:
        t = await swarm.tasks.create("bounded work", lease_ttl_s=30, start_to_close_s=2,
                                     max_attempts=1)  # no second attempt to wait for
        await asyncio.wait_for(exe.started.wait(), 10)
        await until(swarm, t.task_id, lambda s: s.status != "claimed", within=10)
        seen = time.monotonic()
        stopped = exe.stopped_at
    assert stopped is not None and stopped < seen, "the work ran on after its claim expired"
    history = await swarm.tasks.history(t.task_id)
    assert [x.event.data.reason for x in history
            if isinstance(x.event.data, ev.TaskLeaseExpired)] == ["start-to-close timeout"]
    assert w.stats.lost == 1


@pytest.mark.integration
async def test_a_status_write_that_failed_is_tried_again(
        swarm: Swarm, nats_url: str, swarm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage during the "busy" write must not leave the agent shown idle (or busy
    with a finished task) until its status happens to change again."""
    from cflow.errors import Unavailable

    exe = UntilStopped()
    async with running_worker(nats_url, swarm_name, exe, name="flaky-status") as w:
        assert w.agent is not None
        set_status = w.agent.set_status
        tries: list[str] = []
        busy = asyncio.Event()

        async def flaky(status: Any, *args: Any, **kwargs: Any) -> bool:
            tries.append(status)
            if status == "busy" and tries.count("busy") == 1:
                raise Unavailable("nats away")
            stored = await set_status(status, *args, **kwargs)
            if status == "busy":
                busy.set()
            return stored

        monkeypatch.setattr(w.agent, "set_status", flaky)
        t = await swarm.tasks.create("long work")
        await asyncio.wait_for(exe.started.wait(), 10)
        await asyncio.wait_for(busy.wait(), 10)
        info = await swarm.agents.get("flaky-status")
        w.abort()  # the work runs until stopped
    assert (info.status, info.task_id, tries[:2]) == ("busy", t.task_id, ["busy", "busy"])




@pytest.mark.integration
async def test_a_claim_late_for_its_start_to_close_timeout_counts_its_attempt(
        swarm: Swarm, nats_url: str, swarm_name: str) -> None:
    """A claim that came back past its task's start-to-close timeout (shorter than a
    claim takes) is not given back with its attempt refunded: it would be claimed and
    given back forever. It is left to the reapers, and its attempt counts."""
    t = await swarm.tasks.create("too short to run", start_to_close_s=0.2, max_attempts=1)
    lease = await swarm.tasks.claim(t.task_id, agent="late")
    assert lease is not None
    await asyncio.sleep(max(0.0, lease.deadline - time.monotonic()) + 0.01)  # time itself
    exe = CountingExecutor()
    await Worker(swarm, exe, WorkerOptions(name="late"))._run_one(lease)
    assert exe.runs == 0 and (await swarm.tasks.get(t.task_id)).status == "claimed"
    async with maintained(nats_url, swarm_name):
        done = await until(swarm, t.task_id, lambda s: s.status in ("failed", "ready"))
    assert (done.status, done.attempt) == ("failed", 1)
