"""A task whose declared paths another holder reserved is not claimed until they are free.

Real `cfctl worker --repo` processes, real git; what ran is read from a log the task
commands write (outside the worktrees), not only from the events.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cflow import events as ev
from cflow.errors import ReservationConflict
from cflow.streams import StoredEvent, names
from cflow.swarm import Swarm
from support import until
from test_gitflow import make_remote
from test_gitflow_chaos import kill_pid
from test_worker import start_worker, stop, until_claimed, wait_file

pytestmark = [pytest.mark.integration]


def script(run_log: Path, pid_file: Path, go: Path) -> str:
    """Every attempt logs its start and end; attempt 1 of task A holds until ``go`` exists."""
    return (f'echo "start $CFLOW_TASK_TITLE $CFLOW_TASK_ATTEMPT" >> {run_log}; '
            f'if [ "$CFLOW_TASK_TITLE" = A ] && [ "$CFLOW_TASK_ATTEMPT" = 1 ]; then '
            f'echo $$ > {pid_file}; while [ ! -e {go} ]; do sleep 0.05; done; fi; '
            'echo "$CFLOW_TASK_TITLE" > shared.txt; '
            f'echo "end $CFLOW_TASK_TITLE $CFLOW_TASK_ATTEMPT" >> {run_log}')


def runs(run_log: Path) -> list[tuple[str, str]]:
    """(start|end, task title) in the order they happened."""
    return [(kind, title) for kind, title, _ in
            (line.split() for line in run_log.read_text().splitlines())]


def never_overlap(order: list[tuple[str, str]]) -> None:
    """Each start is followed by its own end before any other start."""
    running: str | None = None
    for kind, title in order:
        if kind == "start":
            assert running is None, f"{title} started while {running} ran: {order}"
            running = title
        else:
            assert running == title, order
            running = None


async def reservation_events(swarm: Swarm) -> list[StoredEvent]:
    items = await swarm.log.read(names.events_filter(swarm.name, "reservation"))
    return [i for i in items if isinstance(i, StoredEvent)]


async def test_a_task_whose_paths_are_held_is_not_claimed_until_they_are_released(
        swarm: Swarm, cli_env: dict[str, str], tmp_path: Path) -> None:
    remote = make_remote(tmp_path, {"shared.txt": "original\n"})
    run_log, pid_file, go = tmp_path / "runs.log", tmp_path / "a.pid", tmp_path / "go"
    cmd = script(run_log, pid_file, go)
    procs = [start_worker(cli_env, "--repo", str(remote), "--exec", cmd, name=n)
             for n in ("w1", "w2")]
    try:
        a = await swarm.tasks.create("A", priority=2, labels={"paths": "shared.txt"})
        await until_claimed(swarm, a.task_id)
        await wait_file(pid_file, within=20)  # A runs: its paths are reserved (before the run)
        b = await swarm.tasks.create("B", priority=1, labels={"paths": "shared.txt"})
        c = await swarm.tasks.create("C", priority=0)  # no paths: the idle worker takes it
        await until(swarm, c.task_id, lambda s: s.status == "completed", within=20)
        # The idle worker was offered B first (higher priority) and did not claim it.
        assert (await swarm.tasks.get(b.task_id)).status == "ready"
        assert [e.event.type for e in await swarm.log.entity_events("task", b.task_id)] \
            == ["TaskCreated"]
        with pytest.raises(ReservationConflict):  # nor can a claim by id take it
            await swarm.tasks.claim(b.task_id, agent="someone")
        go.touch()
        done = await until(swarm, b.task_id, lambda s: s.status == "completed", within=20)
    finally:
        for p in procs:
            stop(p)
    assert done.attempt == 1 and done.error is None  # no attempt burnt waiting
    order = runs(run_log)
    assert order == [("start", "A"), ("start", "C"), ("end", "C"), ("end", "A"),
                     ("start", "B"), ("end", "B")]
    events = await reservation_events(swarm)
    task_of = {e.event.entity_id: e.event.data.task_id for e in events
               if isinstance(e.event.data, ev.PathsReserved)}
    seq = {(e.event.type, task_of.get(e.event.entity_id)): e.seq for e in events}
    assert seq["PathsReserved", a.task_id] < seq["PathsReleased", a.task_id] \
        < seq["PathsReserved", b.task_id]

async def test_holder_killed_its_paths_free_when_its_lease_ends(
        swarm: Swarm, cli_env: dict[str, str], tmp_path: Path) -> None:
    """kill -9 of the worker holding A's paths: A (retried) and B both run, never together,
    within a few lease TTLs; nothing is stranded, nothing runs twice at once."""
    remote = make_remote(tmp_path, {"shared.txt": "original\n"})
    run_log, pid_file, go = tmp_path / "runs.log", tmp_path / "a.pid", tmp_path / "go"
    cmd = script(run_log, pid_file, go)
    a = await swarm.tasks.create("A", lease_ttl_s=2, backoff_initial_s=0.1,
                                 labels={"paths": "shared.txt"})
    victim = start_worker(cli_env, "--repo", str(remote), "--exec", cmd, name="victim")
    rescuer = None
    child = None
    try:
        first = await until_claimed(swarm, a.task_id, "victim")
        child = int(await wait_file(pid_file, within=20))
        b = await swarm.tasks.create("B", lease_ttl_s=2, labels={"paths": "shared.txt"})
        rescuer = start_worker(cli_env, "--repo", str(remote), "--exec", cmd, "-k", "2",
                               name="rescuer")
        victim.kill()  # kill -9 while A holds the paths
        victim.wait(10)
        kill_pid(child)
        done_a = await until(swarm, a.task_id, lambda s: s.status == "completed", within=30)
        done_b = await until(swarm, b.task_id, lambda s: s.status == "completed", within=30)
    finally:
        stop(victim)
        if rescuer is not None:
            stop(rescuer)
        if child is not None:
            kill_pid(child)
    assert done_a.owner == done_b.owner == "rescuer" and done_a.epoch != first.epoch
    order = runs(run_log)
    assert order[0] == ("start", "A")  # the victim's attempt, never ended
    never_overlap(order[1:])
    assert sorted(order[1:]) == [("end", "A"), ("end", "B"), ("start", "A"), ("start", "B")]
