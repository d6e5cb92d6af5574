"""Merge queue operations: remove, skip, requeue (fenced against a running merger) and
--delete-merged. Real git, real NATS, a real `cfctl merge-queue` process killed -9."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.errors import InvalidState
from cflow.gitflow import queue_ops
from cflow.gitflow.merger import Merger, read_queue
from cflow.gitflow.queue import fold_merges, queue_order
from cflow.gitflow.worktrees import WorkArea
from cflow.swarm import Swarm
from test_gitflow import (
    finished,
    forge_intent,
    main_files,
    make_remote,
    merger,
    sh,
    until_decided,
)
from test_gitflow_chaos import kill_pid, merge_events
from test_worker import CFCTL, stop, wait_file

pytestmark = [pytest.mark.integration]

def _ev(data: ev.EventData, task: str, actor: str = "w") -> ev.Event:
    return ev.make_event(data, swarm="s", entity_id=task, hlc="0" * 20, actor=actor)


def test_fold_remove_skip_requeue_and_no_removal_under_an_intent() -> None:
    def request(task: str) -> ev.Event:
        return _ev(ev.MergeRequested(task_id=task, epoch=1, branch=f"cflow/{task}",
                                     head="a" * 40), task)

    def op(kind: type[ev.MergeRemoved] | type[ev.MergeDeferred], task: str) -> ev.Event:
        return _ev(kind(task_id=task, head="a" * 40, by="alice", reason="why"), task, "alice")

    items = [(1, request("a"), 1), (2, request("b"), 2), (3, request("c"), 3),
             (4, op(ev.MergeDeferred, "a"), 4), (5, op(ev.MergeRemoved, "c"), 5)]
    queue = fold_merges(items)
    assert [r.task_id for r in queue_order(queue.values(), "main")] == ["b", "a"]
    assert (queue["c"].status, queue["c"].removed_by, queue["c"].output) \
        == ("removed", "alice", "why")
    queue = fold_merges([*items, (6, op(ev.MergeDeferred, "c"), 6)])  # requeued: at the end
    assert [r.task_id for r in queue_order(queue.values(), "main")] == ["b", "a", "c"]
    intent = _ev(ev.MergeStarted(task_id="b", head="a" * 40, target="main", previous="p",
                                 commit="q", tree="t", merger="m1"), "b")
    queue = fold_merges([*items, (6, intent, 6), (7, op(ev.MergeRemoved, "b"), 7)])
    assert queue["b"].status == "queued" and queue["b"].pushing  # the intent stands


def cfctl(cli_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CFCTL, *args], env=cli_env, capture_output=True, text=True,
                          check=False, timeout=60)


async def test_removed_while_checked_is_never_merged_and_merger_killed_mid_check(
        swarm: Swarm, cli_env: dict[str, str], nats_url: str, swarm_name: str,
        tmp_path: Path) -> None:
    """m1 checks A; A is removed (acknowledged); A's check then passes: m1 must not push
    it and takes B. m1 is killed -9 during B's check; m2 merges B once; A stays out."""
    remote = make_remote(tmp_path)
    a, b = await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "A", "B",
                          priorities=(1, 0))
    count, checking, go = tmp_path / "count", tmp_path / "checking", tmp_path / "go"
    check = (f'n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; '
             f'if [ $n = 1 ]; then echo $$ > {checking}1; '
             f'while [ ! -e {go} ]; do sleep 0.05; done; fi; '
             f'if [ $n = 2 ]; then echo $$ > {checking}2; exec sleep 60; fi')
    before = sh("rev-parse", "main", cwd=remote)
    with open(tmp_path / "m1.log", "ab") as out:
        proc = subprocess.Popen([*CFCTL, "merge-queue", "--repo", str(remote), "--check", check,
                                 "--lease-ttl", "2", "--name", "m1", "--delete-merged"],
                                env=cli_env, stdout=subprocess.DEVNULL, stderr=out)
    check_pid = None
    try:
        await wait_file(Path(f"{checking}1"), within=30)  # m1 is checking A
        removed = cfctl(cli_env, "merges", "remove", a.task_id[:13], "--reason", "not wanted",
                        "--agent", "alice")
        assert removed.returncode == 0, removed.stderr
        assert f"{a.task_id} (cflow/{a.task_id}) removed from the merge queue of main by " \
               "alice" in removed.stdout
        go.touch()  # A's check passes after the removal was acknowledged
        check_pid = int(await wait_file(Path(f"{checking}2"), within=30))  # m1 took B
        assert [e.type for e in await merge_events(swarm) if e.entity_id == a.task_id] \
            == ["MergeRequested", "MergeRemoved"]  # m1's intent for A was refused
        proc.kill()  # kill -9 mid-check of B
        proc.wait(10)
        kill_pid(check_pid)
        async with merger(nats_url, swarm_name, remote, tmp_path / "m2", name="m2",
                          check=check, lease_ttl_s=2.0, delete_merged=True) as m2:
            queue = await until_decided(swarm, 2, within=30)
    finally:
        stop(proc)
        if check_pid is not None:
            kill_pid(check_pid)
    assert queue[a.task_id].status == "removed" and queue[b.task_id].status == "merged"
    assert m2.stats.merged == 1
    events = await merge_events(swarm)
    assert Counter(e.entity_id for e in events if e.type == "Merged") == {b.task_id: 1}
    removal = next(e for e in events if e.type == "MergeRemoved")
    assert isinstance(removal.data, ev.MergeRemoved)
    assert (removal.actor, removal.data.by, removal.data.reason) == ("alice", "alice",
                                                                      "not wanted")
    files = main_files(remote, tmp_path)
    assert "B.txt" in files and "A.txt" not in files
    subprocess.run(["git", "merge-base", "--is-ancestor", before, "main"], cwd=remote,
                   check=True)  # the target lost nothing
    branches = sh("for-each-ref", "--format=%(refname:short)", "refs/heads/", cwd=remote)
    assert f"cflow/{a.task_id}" in branches  # removed, its work kept
    assert f"cflow/{b.task_id}" not in branches  # merged: deleted (--delete-merged)
    listed = cfctl(cli_env, "--json", "merges", "--all")
    assert listed.returncode == 0, listed.stderr
    rows = {r["task_id"]: r for r in json.loads(listed.stdout)}
    assert (rows[a.task_id]["status"], rows[a.task_id]["removed_by"]) == ("removed", "alice")
    again = cfctl(cli_env, "merges", "remove", b.task_id)
    assert again.returncode != 0 and again.stderr.count("\n") == 1
    assert "it is merged" in again.stderr


async def test_no_removal_once_a_merger_recorded_its_intent(
        swarm: Swarm, cli_env: dict[str, str], nats_url: str, swarm_name: str,
        tmp_path: Path) -> None:
    """A merger died between its intent and its push: the push may have landed, so a
    removal (or skip) is refused with one line; the next merger pushes it, once."""
    remote = make_remote(tmp_path)
    (t,) = await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "T")
    await forge_intent(swarm, remote, tmp_path / "dead", t.task_id, merger="m0")
    refused = cfctl(cli_env, "merges", "remove", t.task_id)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1
    assert "merger m0 recorded its intent to push it" in refused.stderr
    with pytest.raises(InvalidState, match="wait for its verdict"):
        await queue_ops.skip_request(swarm, t.task_id)
    async with merger(nats_url, swarm_name, remote, tmp_path / "m"):
        queue = await until_decided(swarm, 1)
    assert queue[t.task_id].status == "merged"
    types = [e.type for e in await merge_events(swarm)]
    assert types.count("Merged") == 1 and "MergeRemoved" not in types
    assert "MergeDeferred" not in types


async def test_skip_and_requeue_reorder_and_delete_merged_at_takeover(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "X", "Y", "Z")
    x, y, z = (r.task_id for r in queue_order((await read_queue(swarm)).values(), "main"))
    skipped = await queue_ops.skip_request(swarm, x, "flaky check")
    assert skipped.status == "queued"
    assert (await queue_ops.remove_request(swarm, z)).status == "removed"
    with pytest.raises(InvalidState, match="it is removed"):
        await queue_ops.skip_request(swarm, z)
    assert (await queue_ops.requeue_request(swarm, z)).status == "queued"
    async with merger(nats_url, swarm_name, remote, tmp_path / "m1"):
        await until_decided(swarm, 3)
    merged_order = [line.split()[1] for line in reversed(sh(
        "log", "--first-parent", "--format=%b", "main", cwd=remote).splitlines())
        if line.startswith("Cflow-Task: ")]
    assert merged_order == [y, x, z]
    # A merger without --delete-merged left the branches; one with it deletes them at
    # takeover, except a branch pushed to since its merge (the delete is fenced).
    clone = tmp_path / "c"
    sh("clone", "--quiet", "-b", f"cflow/{x}", str(remote), str(clone))
    sh("commit", "--quiet", "--allow-empty", "-m", "more work", cwd=clone)
    sh("push", "--quiet", "origin", f"cflow/{x}", cwd=clone)
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="m2") as s:
        m2 = Merger(s, str(remote), area=WorkArea(str(remote), tmp_path / "m2"),
                    delete_merged=True)
        stats = await asyncio.wait_for(m2.run(until_idle=True), 30)
    assert stats.branches_deleted == 2 and stats.merged == 0
    branches = sh("for-each-ref", "--format=%(refname:short)", "refs/heads/", cwd=remote)
    assert sorted(branches.split()) == sorted(["main", f"cflow/{x}"])
