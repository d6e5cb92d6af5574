"""Git workflow under kill -9 (real `cfctl worker --repo` and `cfctl merge-queue` processes),
the merger's recovery, the generic checkpoint, and path reservations of a claim."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.errors import LeaseLost, NotHolder
from cflow.gitflow.executor import WithPrevious
from cflow.streams import StoredEvent, names
from cflow.swarm import Swarm
from cflow.worker.subprocess_exec import SubprocessExecutor
from support import until
from test_gitflow import (
    finished,
    forge_intent,
    git_worker,
    main_files,
    make_remote,
    merger,
    sh,
    until_decided,
)
from test_worker import CFCTL, running_worker, start_worker, stop, until_claimed, wait_file

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def cli_root(cli_env: dict[str, str], remote: Path) -> Path:
    """The area root a `cfctl worker --repo` subprocess uses (under its XDG_DATA_HOME)."""
    digest = hashlib.sha256(str(remote.resolve()).encode()).hexdigest()[:12]
    return Path(cli_env["XDG_DATA_HOME"]) / "cflow" / "gitflow" / digest


async def branch_has(remote: Path, branch: str, path: str, within: float = 15.0) -> str:
    """The branch head once it contains ``path`` (git has no events: look every 50 ms)."""
    async with asyncio.timeout(within):
        while True:
            code = subprocess.run(["git", "cat-file", "-e", f"{branch}:{path}"], cwd=remote,
                                  capture_output=True, check=False).returncode
            if code == 0:
                return sh("rev-parse", branch, cwd=remote)
            await asyncio.sleep(0.05)


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def merge_events(swarm: Swarm) -> list[ev.Event]:
    items = await swarm.log.read(names.events_filter(swarm.name, "merge"))
    return [i.event for i in items if isinstance(i, StoredEvent)]


async def test_worker_killed_after_wip_push_next_holder_continues(
        swarm: Swarm, cli_env: dict[str, str], nats_url: str, swarm_name: str,
        tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    t = await swarm.tasks.create("two parts", lease_ttl_s=2, backoff_initial_s=0.1)
    pidfile = tmp_path / "pid"
    script = ('if [ -f part1.txt ]; then echo two > part2.txt; '
              'printf "%s" "$CFLOW_BRANCH_HEAD" > seen-head.txt; '
              'printf "%s" "$CFLOW_PREVIOUS" > seen-previous.txt; '
              f'else echo one > part1.txt; echo $$ > {pidfile}; exec sleep 60; fi')
    proc = start_worker(cli_env, "--repo", str(remote), "--exec", script, "--wip-every", "0.3",
                        name="victim")
    child = None
    try:
        first = await until_claimed(swarm, t.task_id, "victim")
        child = int(await wait_file(pidfile))
        wip = await branch_has(remote, f"cflow/{t.task_id}", "part1.txt")
        async with asyncio.timeout(15):  # and after its note saying so (written after the push)
            async for item in swarm.log.follow(names.events_filter(swarm.name, "note")):
                if isinstance(item, StoredEvent) and item.event.entity_id == t.task_id \
                        and isinstance(item.event.data, ev.TaskNoted) \
                        and wip[:12] in item.event.data.text:
                    break
        proc.kill()  # kill -9 mid-task, after a work-in-progress push
        proc.wait(10)
        kill_pid(child)
        root = cli_root(cli_env, remote)
        assert any(root.glob("areas/*/worktrees/*"))  # the victim's worktree, left behind
        async with git_worker(nats_url, swarm_name, remote, root, "rescuer", script) as w, \
                merger(nats_url, swarm_name, remote, tmp_path / "m"):
            await until_decided(swarm, 1, within=30)
            assert w.executor.area.cleaned  # type: ignore[attr-defined]
    finally:
        stop(proc)
        if child is not None:
            kill_pid(child)
    done = await swarm.tasks.get(t.task_id)
    assert done.status == "completed" and done.owner == "rescuer" and done.epoch != first.epoch
    files = main_files(remote, tmp_path)
    assert files["part1.txt"] == "one" and files["part2.txt"] == "two"
    assert files["seen-head.txt"] == wip  # the next holder started from the pushed WIP
    assert "victim" in files["seen-previous.txt"] and wip[:12] in files["seen-previous.txt"]
    # the first holder's commit is in the final merge
    subprocess.run(["git", "merge-base", "--is-ancestor", wip, "main"], cwd=remote, check=True)
    body = sh("log", "--format=%B", "main", cwd=remote)
    assert f"Cflow-Epoch: {first.epoch}" in body and f"Cflow-Epoch: {done.epoch}" in body
    assert not any(root.glob("areas/*/worktrees/*"))  # stale worktree cleaned at start


async def test_merger_killed_mid_merge_another_takes_over(
        swarm: Swarm, cli_env: dict[str, str], nats_url: str, swarm_name: str,
        tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    tasks = await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "f0", "f1", "f2")
    count, checking = tmp_path / "count", tmp_path / "checking"
    # The second check (the second merge) hangs: the merger is killed during it.
    check = (f'n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; '
             f'if [ $n = 2 ]; then echo $$ > {checking}; exec sleep 60; fi')
    heads = [sh("rev-parse", "main", cwd=remote)]
    with open(tmp_path / "m1.log", "ab") as out:
        proc = subprocess.Popen([*CFCTL, "merge-queue", "--repo", str(remote), "--check", check,
                                 "--lease-ttl", "2", "--name", "m1"], env=cli_env,
                                stdout=subprocess.DEVNULL, stderr=out)
    check_pid = None
    try:
        check_pid = int(await wait_file(checking, within=30))
        heads.append(sh("rev-parse", "main", cwd=remote))  # after m1's first merge
        proc.kill()
        proc.wait(10)
        stat = Path(f"/proc/{check_pid}/stat")
        assert stat.exists()  # the check outlives its merger (a session of its own) ...
        # ... until a merger adopts the dead one's area (same root) and kills its group
        async with merger(nats_url, swarm_name, remote, cli_root(cli_env, remote), name="m2",
                          check=check, lease_ttl_s=2.0) as m2:
            queue = await until_decided(swarm, 3, within=30)
            assert f"process group {check_pid}" in m2.area.cleaned
    finally:
        stop(proc)
        if check_pid is not None:
            kill_pid(check_pid)
    assert heads[1] != heads[0]  # m1 merged one request before it died
    assert {r.status for r in queue.values()} == {"merged"}
    assert m2.stats.merged == 2
    merged = Counter(e.entity_id for e in await merge_events(swarm) if e.type == "Merged")
    assert merged == Counter({t.task_id: 1 for t in tasks})  # none merged twice
    for old in heads:  # the target never lost a commit
        subprocess.run(["git", "merge-base", "--is-ancestor", old, "main"], cwd=remote,
                       check=True)
    trailers = [line.split()[1] for line in sh("log", "--first-parent", "--format=%b", "main",
                                               cwd=remote).splitlines()
                if line.startswith("Cflow-Task: ")]
    assert sorted(trailers) == sorted(t.task_id for t in tasks)
    assert {f"f{i}.txt" for i in range(3)} <= set(main_files(remote, tmp_path))


async def test_merger_records_a_merge_pushed_before_it_died(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    """The push landed, the Merged record did not: the next merger records it, merging nothing."""
    remote = make_remote(tmp_path)
    (t,) = await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "pushed",
                          command="echo x > x.txt")
    clone = tmp_path / "clone"
    sh("clone", "--quiet", str(remote), str(clone))
    sh("merge", "--no-ff", "-m", "merged by a merger that then died",
       f"origin/cflow/{t.task_id}", cwd=clone)
    sh("push", "--quiet", "origin", "main", cwd=clone)
    pushed = sh("rev-parse", "main", cwd=remote)
    async with merger(nats_url, swarm_name, remote, tmp_path / "m") as m:
        queue = await until_decided(swarm, 1)
    assert queue[t.task_id].status == "merged" and queue[t.task_id].commit == pushed
    assert m.stats.recovered == 1 and sh("rev-parse", "main", cwd=remote) == pushed


async def test_successor_pushes_a_stale_mergers_intent_instead_of_deciding_anew(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    """A merger recorded MergeStarted (check green) and paused before its push. The next
    holder, whose check would now be red, pushes the same merge; the late push is refused."""
    remote = make_remote(tmp_path)
    (t,) = await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "intent",
                          command="echo x > x.txt")
    clone = tmp_path / "stale"  # what the paused merger had done
    before, stale_commit, tree = await forge_intent(swarm, remote, clone, t.task_id)
    async with merger(nats_url, swarm_name, remote, tmp_path / "m", check="exit 1"):
        queue = await until_decided(swarm, 1)
    assert queue[t.task_id].status == "merged"  # not rejected by the now red check
    after = sh("rev-parse", "main", cwd=remote)
    assert after != stale_commit and sh("rev-parse", "main^{tree}", cwd=remote) == tree
    late = subprocess.run(["git", "push", f"--force-with-lease=main:{before}", "origin",
                           "HEAD:main"], cwd=clone, capture_output=True, text=True)
    assert late.returncode != 0 and sh("rev-parse", "main", cwd=remote) == after


async def test_merger_paused_past_its_lease_does_not_push_when_it_wakes(
        swarm: Swarm, cli_env: dict[str, str], nats_url: str, swarm_name: str,
        tmp_path: Path) -> None:
    """SIGSTOP the merger during its (green) check, past its lease: the successor rejects
    the request (its check is red); SIGCONT: the woken merger must not push."""
    remote = make_remote(tmp_path)
    (t,) = await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "paused",
                          command="echo x > x.txt")
    count, checking, go = tmp_path / "count", tmp_path / "checking", tmp_path / "go"
    check = (f'n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; '
             f'if [ $n = 1 ]; then echo $$ > {checking}; '
             f'while [ ! -e {go} ]; do sleep 0.05; done; exit 0; fi; echo red; exit 1')
    before = sh("rev-parse", "main", cwd=remote)
    log = tmp_path / "m1.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([*CFCTL, "merge-queue", "--repo", str(remote), "--check", check,
                                 "--lease-ttl", "2", "--name", "m1"], env=cli_env,
                                stdout=subprocess.DEVNULL, stderr=out)
    try:
        await wait_file(checking, within=30)
        os.kill(proc.pid, signal.SIGSTOP)
        go.touch()  # m1's check passes while m1 is paused
        async with merger(nats_url, swarm_name, remote, tmp_path / "m2", name="m2",
                          check=check, lease_ttl_s=2.0):
            queue = await until_decided(swarm, 1, within=30)
            assert queue[t.task_id].status == "rejected"
            os.kill(proc.pid, signal.SIGCONT)
            async with asyncio.timeout(20):  # m1 notices it lost the queue (its log says so)
                while b"lost" not in log.read_bytes():
                    await asyncio.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        stop(proc)
    assert sh("rev-parse", "main", cwd=remote) == before  # the rejected work stayed out
    assert [e.type for e in await merge_events(swarm)] == ["MergeRequested", "MergeRejected"]


async def test_generic_checkpoint_reaches_the_next_attempt_and_is_fenced(
        swarm: Swarm, cli_env: dict[str, str], nats_url: str, swarm_name: str) -> None:
    t = await swarm.tasks.create("resumable", lease_ttl_s=5, backoff_initial_s=0.1)
    lease = await swarm.tasks.claim(t.task_id, agent="a1")
    assert lease is not None
    await lease.checkpoint("step 1 of 3")
    out = subprocess.run([*CFCTL, "task", "checkpoint", t.task_id, "step 2 of 3", "--epoch",
                          str(lease.epoch), "--agent", "a1"], env=cli_env, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stderr
    with pytest.raises(NotHolder):  # only the holder of record may checkpoint
        await swarm.tasks.note(t.task_id, "x", epoch=lease.epoch, artifact="checkpoint",
                               actor="intruder")
    await lease.release("handing over")
    with pytest.raises(LeaseLost):
        await lease.checkpoint("late")  # a fenced holder's checkpoint is refused
    exe = WithPrevious(SubprocessExecutor('echo "$CFLOW_CHECKPOINT"'), swarm)
    async with running_worker(nats_url, swarm_name, exe, name="a2"):
        done = await until(swarm, t.task_id, lambda s: s.status == "completed")
    assert done.result == "step 2 of 3\n"


async def test_declared_paths_are_reserved_for_the_attempt(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    held = await swarm.reservations.reserve(["src/"], owner="someone", ttl_s=30)
    t = await swarm.tasks.create("edit src", labels={"paths": "src/a.py"})
    async with git_worker(nats_url, swarm_name, remote, tmp_path / "w", "w1",
                          "mkdir -p src && echo a > src/a.py") as w:
        # not claimed while another owner holds the paths (tests/test_gitflow_paths.py);
        # claimed once they are released, no attempt burnt
        await w.started.wait()
        await swarm.reservations.release("someone", reservation_id=held.id)
        done = await until(swarm, t.task_id, lambda s: s.status == "completed")
    assert w.stats.completed == 1 and done.attempt == 1 and done.error is None
    items = await swarm.log.read(names.events_filter(swarm.name, "reservation"))
    mine = [i for i in items if isinstance(i, StoredEvent) and i.event.actor == "w1"]
    assert [i.event.type for i in mine] == ["PathsReserved", "PathsReleased"]
    data = mine[0].event.data
    assert isinstance(data, ev.PathsReserved) and data.task_id == t.task_id
    assert data.paths == ("src/a.py",)
    released = [i for i in items if isinstance(i, StoredEvent)
                and i.event.type == "PathsReleased" and i.event.actor != "w1"]
    assert released and released[0].seq < mine[0].seq  # taken only after the other's release
