"""A task whose declared paths another holder reserved is not claimed until they are free.

Real `cfctl worker --repo` processes, real git; what ran is read from a log the task
commands write (outside the worktrees), not only from the events.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cflow import events as ev
from cflow.errors import ReservationConflict
from cflow.reservations import ReservationRecord, conflicts
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


def test_one_owners_reservations_for_two_tasks_conflict() -> None:
    """A worker running two tasks at once must not run both on the same paths; an owner's
    own reservations otherwise never conflict (a person, an agent without a task)."""
    def held(rid: str, task: str | None, owner: str = "w1") -> ReservationRecord:
        return ReservationRecord(id=rid, owner=owner, patterns=("src/a.py",), task_id=task)

    assert conflicts(held("1", "t1"), [held("2", "t2")])
    assert not conflicts(held("1", "t1"), [held("2", "t1")])
    assert not conflicts(held("1", None), [held("2", "t2")])
    assert not conflicts(held("1", "t1"), [held("2", None)])
    assert conflicts(held("1", None), [held("2", None, owner="w2")])


async def reservation_events(swarm: Swarm) -> list[StoredEvent]:
    items = await swarm.log.read(names.events_filter(swarm.name, "reservation"))
    return [i for i in items if isinstance(i, StoredEvent)]


async def test_a_task_whose_paths_are_held_is_not_claimed_until_they_are_released(
        swarm: Swarm, cli_env: dict[str, str], tmp_path: Path) -> None:
    """Two workers of two slots each. B (sharing A's path) is not claimed while A runs, not
    even by A's own worker's free slot; once A ends, B, D and E (all on that path) are
    claimable at once and still run one at a time, each claimed only once the path is free."""
    remote = make_remote(tmp_path, {"shared.txt": "original\n"})
    run_log, pid_file, go = tmp_path / "runs.log", tmp_path / "a.pid", tmp_path / "go"
    cmd = script(run_log, pid_file, go)
    procs = [start_worker(cli_env, "--repo", str(remote), "--exec", cmd, "-k", "2", name=n)
             for n in ("w1", "w2")]
    shared = {"paths": "shared.txt"}
    try:
        a = await swarm.tasks.create("A", priority=2, labels=shared)
        await until_claimed(swarm, a.task_id)
        await wait_file(pid_file, within=20)  # A runs: its paths are reserved (by its claim)
        b = await swarm.tasks.create("B", priority=1, labels=shared)
        c = await swarm.tasks.create("C", priority=0)  # no paths: a free slot takes it
        await until(swarm, c.task_id, lambda s: s.status == "completed", within=20)
        # Three free slots were offered B first (higher priority) and did not claim it.
        assert (await swarm.tasks.get(b.task_id)).status == "ready"
        assert [e.event.type for e in await swarm.log.entity_events("task", b.task_id)] \
            == ["TaskCreated"]
        with pytest.raises(ReservationConflict):  # nor can a claim by id take it
            await swarm.tasks.claim(b.task_id, agent="someone")
        more = [await swarm.tasks.create(t, labels=shared) for t in ("D", "E")]
        go.touch()
        done = [await until(swarm, t.task_id, lambda s: s.status == "completed", within=30)
                for t in (b, *more)]
    finally:
        for p in procs:
            stop(p)
    assert all(t.attempt == 1 and t.error is None for t in done)  # no attempt burnt waiting
    order = runs(run_log)
    assert order[:3] == [("start", "A"), ("start", "C"), ("end", "C")]
    never_overlap([line for line in order if line[1] != "C"])
    # From the log: no task on the path was claimed while another task's reservation of it
    # was live; every claim came after its own reservation.
    items = [i for i in await swarm.log.read(names.events_filter(swarm.name))
             if isinstance(i, StoredEvent)]
    task_of: dict[str, str | None] = {}
    live: set[str | None] = set()
    path_tasks = {a.task_id, b.task_id, *(t.task_id for t in more)}
    for item in items:
        data = item.event.data
        if isinstance(data, ev.PathsReserved):
            task_of[item.event.entity_id] = data.task_id
            live.add(data.task_id)
        elif isinstance(data, ev.PathsReleased):
            live.discard(task_of.get(item.event.entity_id))
        elif isinstance(data, ev.TaskClaimed) and item.event.entity_id in path_tasks:
            assert live == {item.event.entity_id}, (item.event.entity_id, live)


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
