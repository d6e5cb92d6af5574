"""Chaos: real `cfctl worker` processes killed -9 and paused while they drain a swarm.

The invariants are checked from the event log, which is the record of truth:
every task ends completed, exactly one ``TaskCompleted`` per task, and the
claims of one task never overlap (each claim ends - expiry, completion, failure,
release - before the next one starts, and a completion is only ever accepted
from the claim of record).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.streams import StoredEvent, names
from cflow.swarm import Swarm
from faults import ExecutionLog, proxies
from test_worker import CFCTL, SubprocessExecutor, running_worker, until, until_claimed

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

# A recorded execution ends when the recorder's watcher saw its process gone: on a
# loaded machine a little after the kill (without the watcher's kill-by time, the
# commands below lived 1.7 s to minutes longer).
SEEN_DEAD_SLACK_S = 0.5

ENDS_CLAIM = (ev.TaskLeaseExpired, ev.TaskCompleted, ev.TaskFailed, ev.TaskReleased,
              ev.TaskCancelled)


def check_claims(items: list[StoredEvent]) -> dict[str, Counter[str]]:
    """Per task: claims never overlap, completions come from the claim of record."""
    by_task: dict[str, list[StoredEvent]] = {}
    for item in items:
        by_task.setdefault(item.event.entity_id, []).append(item)
    stats: dict[str, Counter[str]] = {}
    for task_id, events in by_task.items():
        open_claim: StoredEvent | None = None
        last_end_hlc = ""
        counts: Counter[str] = Counter()
        for item in events:
            data = item.event.data
            counts[item.event.type] += 1
            if isinstance(data, ev.TaskClaimed):
                assert open_claim is None, f"{task_id}: claim {item.seq} while {open_claim} open"
                assert item.event.hlc >= last_end_hlc, f"{task_id}: claim before the last end"
                open_claim = item
            elif isinstance(data, ENDS_CLAIM) and open_claim is not None:
                epoch = getattr(data, "epoch", None)
                assert epoch in (None, open_claim.seq), f"{task_id}: end of a stale epoch"
                if isinstance(data, ev.TaskCompleted):
                    assert item.event.actor == open_claim.event.data.owner  # type: ignore[attr-defined]
                open_claim = None
                last_end_hlc = item.event.hlc
        stats[task_id] = counts
    return stats


class Fleet:
    """`cfctl worker` subprocesses that come and go."""

    def __init__(self, env: dict[str, str], logdir: Path, command: str) -> None:
        self.env = env
        self.logdir = logdir
        self.command = command
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started = 0
        self.killed: list[str] = []

    def start(self, *extra: str) -> str:
        self.started += 1
        name = f"cw{self.started}"
        with open(self.logdir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [*CFCTL, "worker", "--name", name, "--exec", self.command,
                 "--concurrency", "2", "--drain-grace", "5", *extra],
                env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        return name

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def kill9(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)
        self.killed.append(name)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def test_500_tasks_drained_while_workers_are_killed(
        nats_url: str, swarm_name: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    n_tasks, lease_ttl = 500, 2.0
    rng = random.Random(4)
    t0 = time.monotonic()
    fleet = Fleet(cli_env, tmp_path, 'sleep "0.0$(( $(od -An -N1 -tu1 /dev/urandom) % 9 + 1 ))"')
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="chaos") as s:
        try:
            for _ in range(4):
                fleet.start()
            ids = [(await s.tasks.create(f"job {i}", lease_ttl_s=lease_ttl, max_attempts=20,
                                         backoff_initial_s=0.1, backoff_max_s=0.5)).task_id
                   for i in range(n_tasks)]
            board = await s.tasks.ensure_board()

            def completed() -> int:
                return sum(1 for t in ids if (st := board.get(t)) is not None
                           and st.status == "completed")

            kills_at = [n_tasks * f // 10 for f in (1, 2, 3, 4, 5, 6, 7)]
            async with asyncio.timeout(85 - (time.monotonic() - t0)):
                while (done := completed()) < n_tasks:
                    if kills_at and done >= kills_at[0]:
                        kills_at.pop(0)
                        victims = fleet.alive()
                        if len(victims) > 1:
                            fleet.kill9(rng.choice(victims))
                        fleet.start()
                    seen = s.tasks._version
                    await s.tasks._board_moves(seen, 1.0)
        finally:
            fleet.stop_all()
        items = [i for i in await s.log.read(names.events_filter(swarm_name, "task"))
                 if isinstance(i, StoredEvent)]
    elapsed = time.monotonic() - t0
    stats = check_claims(items)
    assert len(stats) == n_tasks
    assert all(c["TaskCompleted"] == 1 for c in stats.values())
    assert len(fleet.killed) >= 5
    expired = sum(c["TaskLeaseExpired"] for c in stats.values())
    reclaimed = sum(1 for c in stats.values() if c["TaskClaimed"] > 1)
    print(f"\nchaos: {n_tasks} tasks, {len(fleet.killed)} kill -9, {fleet.started} workers "
          f"started, {expired} leases expired, {reclaimed} tasks reclaimed, {elapsed:.1f} s")
    assert expired >= 1 and elapsed < 90


async def test_a_frozen_holders_command_dies_before_the_new_holder_starts(
        nats_url: str, swarm_name: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    """A worker frozen by SIGSTOP cannot stop its command when its lease runs out;
    the watcher process kills it before the server can hand the task to another
    worker, and the frozen worker's late report is refused when it wakes up."""
    runs = ExecutionLog(tmp_path)
    ttl = 2.0
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="tester") as s:
        t = await s.tasks.create("contested", lease_ttl_s=ttl, backoff_initial_s=0.1)
        stats_out = tmp_path / "victim.json"
        with open(stats_out, "wb") as out, open(tmp_path / "victim.log", "wb") as err:
            victim = subprocess.Popen(
                [*CFCTL, "--json", "worker", "--name", "victim", "--exec",
                 runs.command(seconds=60), "--max-tasks", "1"],
                env=cli_env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            await until_claimed(s, t.task_id, "victim")
            async with asyncio.timeout(15):
                while not runs.executions(t.task_id):  # its command writes the only signal
                    await asyncio.sleep(0.05)
            os.kill(victim.pid, signal.SIGSTOP)  # the holder freezes with its lease
            frozen_at = time.monotonic()
            async with running_worker(nats_url, swarm_name,
                                      SubprocessExecutor(runs.command(seconds=0.2)),
                                      name="rescuer"):
                done = await until(s, t.task_id, lambda st: st.status == "completed", within=20)
            woken_at = time.monotonic()
            os.kill(victim.pid, signal.SIGCONT)  # it wakes up and reports its late result
            rc = await asyncio.to_thread(victim.wait, 30)
        finally:
            if victim.poll() is None:
                os.kill(victim.pid, signal.SIGCONT)
                victim.kill()
                victim.wait(10)
        history = [i.event for i in await s.tasks.history(t.task_id)]
    first, second = runs.executions(t.task_id)
    assert first.agent == "victim" and second.agent == "rescuer"
    # Killed by the watcher while its worker was frozen, within one TTL of the
    # claim (the last renewal), before the rescuer's execution started. (Its end is
    # when the recorder's own watcher saw it gone: up to a few scheduling delays
    # late on a loaded machine, hence SEEN_DEAD_SLACK_S.)
    assert first.end is not None and first.how in ("dead", "signal-9"), first
    assert first.end < woken_at, (first, woken_at)
    assert first.end - frozen_at < ttl + SEEN_DEAD_SLACK_S, (first, frozen_at)
    assert first.overlap(second) == 0 and first.end <= second.start, (first, second)
    assert rc == 0
    result = json.loads(stats_out.read_text().strip().splitlines()[-1])
    assert result["lost"] == 1 and result["completed"] == 0
    assert done.owner == "rescuer" and done.result == f"ran {t.task_id} attempt 2\n"
    types = [e.type for e in history]
    assert types.count("TaskCompleted") == 1 and types.count("TaskLeaseExpired") == 1
    completed = next(e for e in history if isinstance(e.data, ev.TaskCompleted))
    assert completed.actor == "rescuer"


async def test_a_cut_off_holders_command_that_ignores_sigterm_dies_within_a_ttl(
        nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    """A holder cut off from NATS stops its command at its deadline with SIGTERM and
    SIGKILLs it after a grace period; a command that ignores SIGTERM must still be
    dead before the server's TTL runs out (the grace used to outlast a short TTL)."""
    runs = ExecutionLog(tmp_path)
    ttl = 2.0
    with proxies(nats_url, 1) as [proxy]:
        async with Swarm.connect(nats_url, swarm=swarm_name, agent="tester") as s, \
                running_worker(proxy.url, swarm_name,
                               SubprocessExecutor(runs.command(seconds=60)), name="cut-off"):
            t = await s.tasks.create("stubborn", body=ExecutionLog.body(ignore_term=True),
                                     lease_ttl_s=ttl, max_attempts=1)
            try:
                async with asyncio.timeout(15):
                    while not runs.executions(t.task_id):  # the command's own record
                        await asyncio.sleep(0.05)
                proxy.blackhole()
                cut_at = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ttl + 4):
                        while runs.executions(t.task_id)[0].end is None:
                            await asyncio.sleep(0.05)
            finally:
                proxy.heal()
    (run,) = runs.executions(t.task_id)
    assert run.end is not None, "the command outlived its lease by more than 4 s"
    assert run.end - cut_at < ttl + SEEN_DEAD_SLACK_S, (
        f"the command died {run.end - cut_at:.2f} s after the holder was cut off "
        f"(lease TTL {ttl:g} s): another worker could have claimed the task by then")


async def _exited(pid: int, within: float) -> bool:
    """Whether process ``pid`` (not our child) exits within ``within`` s: its pidfd
    becomes readable when it does."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        async with asyncio.timeout(within):
            await gone
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_a_killed_workers_command_dies_with_everything_it_started(
        nats_url: str, swarm_name: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    """kill -9 of a worker ends its command's whole process group, not only the shell:
    a background child of the command would otherwise work on after the lease
    expires, beside the next holder's execution."""
    pids = tmp_path / "pids"
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="tester") as s:
        t = await s.tasks.create("long build", lease_ttl_s=30.0)
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [*CFCTL, "worker", "--name", "builder", "--exec",
                 f"sleep 120 & echo $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"],
                env=cli_env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        child = 0
        try:
            await until_claimed(s, t.task_id, "builder")
            async with asyncio.timeout(15):
                while not pids.exists():  # the command's own child: a file is the signal
                    await asyncio.sleep(0.05)
            child = int(pids.read_text())
            assert not await _exited(child, 0.2)  # running in the background
            worker.kill()
            worker.wait(10)
            assert await _exited(child, 10), "the command's background child outlived its worker"
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
            if child:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
