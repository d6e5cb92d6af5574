"""Worktree per claim, the branch as checkpoint, the merge queue: real git, real NATS.

Every test makes a bare repository (the shared remote) and clones in a temp dir,
runs real workers (in-process :class:`Worker` with the git executor, or `cfctl
worker --repo` processes where a test kills one) and a real merger, and checks
the target branch's history with git itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cflow import events as ev
from cflow.gitflow.branch import start_attempt
from cflow.gitflow.executor import GitExecutor
from cflow.gitflow.git import PushRefused
from cflow.gitflow.merger import Merger, read_queue
from cflow.gitflow.queue import MergeRequest, fold_merges, queue_order
from cflow.gitflow.report import MERGES_SQL, merge_summary
from cflow.gitflow.worktrees import WorkArea
from cflow.projections.projector import Projector
from cflow.streams import names
from cflow.swarm import Swarm
from cflow.tasks import TaskState
from cflow.worker.runtime import Worker, WorkerOptions
from cflow.worker.subprocess_exec import SubprocessExecutor
from support import until

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def sh(*args: str, cwd: Path | None = None) -> str:
    import os

    out = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                         env={**os.environ, **GIT_ENV})
    return out.stdout.strip()


def make_remote(tmp: Path, files: dict[str, str] | None = None) -> Path:
    """A bare repository with one commit on main."""
    remote = tmp / "remote.git"
    sh("init", "--quiet", "--bare", "-b", "main", str(remote))
    seed = tmp / "seed"
    sh("clone", "--quiet", str(remote), str(seed))
    sh("checkout", "--quiet", "-b", "main", cwd=seed)
    for name, text in (files or {"README": "hello\n"}).items():
        (seed / name).parent.mkdir(parents=True, exist_ok=True)
        (seed / name).write_text(text)
    sh("add", "-A", cwd=seed)
    sh("commit", "--quiet", "-m", "initial", cwd=seed)
    sh("push", "--quiet", "origin", "main", cwd=seed)
    return remote


def main_files(remote: Path, tmp: Path, ref: str = "main") -> dict[str, str]:
    """The files of ``ref`` on the remote, read with git."""
    names = sh("ls-tree", "-r", "--name-only", ref, cwd=remote).splitlines()
    return {n: sh("show", f"{ref}:{n}", cwd=remote) for n in names}


def first_parents(remote: Path, ref: str = "main") -> list[str]:
    return sh("rev-list", "--first-parent", ref, cwd=remote).splitlines()


@contextlib.asynccontextmanager
async def git_worker(nats_url: str, swarm_name: str, remote: Path, root: Path, name: str,
                     command: str, *, wip_every_s: float = 10.0, **opts: object
                     ) -> AsyncIterator[Worker]:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent=name) as s:
        exe = GitExecutor(SubprocessExecutor(command), s, str(remote),
                          area=WorkArea(str(remote), root), wip_every_s=wip_every_s)
        w = Worker(s, exe, WorkerOptions(name=name, url=nats_url, claim_wait_s=2.0,
                                         **opts))  # type: ignore[arg-type]
        run = asyncio.create_task(w.run())
        try:
            await asyncio.wait_for(w.started.wait(), 15)
            yield w
        finally:
            w.drain()
            try:
                await asyncio.wait_for(run, 30)
            finally:
                if not run.done():
                    run.cancel()


@contextlib.asynccontextmanager
async def merger(nats_url: str, swarm_name: str, remote: Path, root: Path, name: str = "m1",
                 **opts: object) -> AsyncIterator[Merger]:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent=name) as s:
        m = Merger(s, str(remote), area=WorkArea(str(remote), root), **opts)  # type: ignore[arg-type]
        run = asyncio.create_task(m.run())
        try:
            yield m
        finally:
            m.stop()
            try:
                await asyncio.wait_for(run, 30)
            finally:
                if not run.done():
                    run.cancel()


WRITE_TITLE = 'echo "$CFLOW_TASK_TITLE" > "$CFLOW_TASK_TITLE.txt"'


async def finished(swarm: Swarm, nats_url: str, swarm_name: str, remote: Path, root: Path,
                   *titles: str, command: str = WRITE_TITLE,
                   priorities: tuple[int, ...] = ()) -> list[TaskState]:
    """Tasks completed by a real git worker running ``command`` (each requested a merge)."""
    tasks = [await swarm.tasks.create(t, priority=p)
             for t, p in zip(titles, priorities or (0,) * len(titles), strict=True)]
    async with git_worker(nats_url, swarm_name, remote, root, "w1", command):
        for t in tasks:
            await until(swarm, t.task_id, lambda s: s.status == "completed")
    return tasks


async def forge_intent(swarm: Swarm, remote: Path, clone: Path, task_id: str,
                       merger: str = "m0") -> tuple[str, str, str]:
    """What a merger that died (or paused) between its intent and its push left: its merge
    in ``clone`` and a ``MergeStarted`` in the log. Returns (target before, commit, tree)."""
    sh("clone", "--quiet", str(remote), str(clone))
    before = sh("rev-parse", "main", cwd=clone)
    sh("merge", "--no-ff", "-m", f"{merger}'s merge", f"origin/cflow/{task_id}", cwd=clone)
    commit, tree = sh("rev-parse", "HEAD", cwd=clone), sh("rev-parse", "HEAD^{tree}", cwd=clone)
    request = (await read_queue(swarm))[task_id]
    await swarm.log.append(ev.MergeStarted(task_id=task_id, head=request.head, target="main",
                                           previous=before, commit=commit, tree=tree,
                                           merger=merger),
                           task_id, expected=request.last_seq)
    return before, commit, tree


async def until_decided(swarm: Swarm, count: int, within: float = 60.0
                        ) -> dict[str, MergeRequest]:
    """Wait (woken by each new event) until ``count`` requests are merged or rejected."""
    async with asyncio.timeout(within):
        async for _ in swarm.log.follow(names.events_filter(swarm.name, "merge")):
            queue = await read_queue(swarm)
            if sum(1 for r in queue.values() if r.status != "queued") >= count:
                return queue
    raise AssertionError("unreachable")


# ----------------------------------------------------------------- pure parts


def _req(seq: int, task: str, prio: int = 0) -> tuple[int, ev.Event, int]:
    data = ev.MergeRequested(task_id=task, epoch=seq, branch=f"cflow/{task}", head="a" * 40,
                             priority=prio)
    return seq, ev.make_event(data, swarm="s", entity_id=task, hlc="0" * 20, actor="w"), seq


def test_queue_fold_orders_by_priority_then_arrival_and_folds_verdicts() -> None:
    items = [_req(1, "a"), _req(2, "b", prio=5), _req(3, "c")]
    merged = ev.make_event(ev.Merged(task_id="a", head="a" * 40, target="main", previous="p",
                                     commit="q", merger="m"),
                           swarm="s", entity_id="a", hlc="0" * 20, actor="m")
    rejected = ev.make_event(ev.MergeRejected(task_id="c", head="a" * 40, target="main",
                                              cause="conflict", output="x"),
                             swarm="s", entity_id="c", hlc="0" * 20, actor="m")
    queue = fold_merges([*items, (4, merged, 1004), (5, rejected, 2005)])
    assert [r.task_id for r in queue_order(queue.values(), "main")] == ["b"]
    assert queue["a"].status == "merged" and queue["a"].commit == "q"
    assert queue["c"].status == "rejected" and queue["c"].cause == "conflict"
    queue = fold_merges(items)
    assert [r.task_id for r in queue_order(queue.values(), "main")] == ["b", "a", "c"]
    summary = merge_summary(fold_merges([*items, (4, merged, 1004), (5, rejected, 2005)]).values())
    assert summary["merged"] == 1 and summary["rejected"] == 1
    assert summary["rejection_rate"] == 0.5 and summary["causes"] == {"conflict": 1}
    assert summary["lead_time_max_s"] == 1.003


def _ev(data: ev.EventData, task: str) -> ev.Event:
    return ev.make_event(data, swarm="s", entity_id=task, hlc="0" * 20, actor="w")


def test_a_late_request_of_a_fenced_holder_changes_nothing() -> None:
    """[request e20, Merged, late request e10] stays merged; [e20, late e10] keeps e20."""
    def request(epoch: int) -> ev.Event:
        return _ev(ev.MergeRequested(task_id="t", epoch=epoch, branch="cflow/t",
                                     head=f"{epoch:040d}"), "t")
    merged = _ev(ev.Merged(task_id="t", head=f"{20:040d}", target="main", previous="p",
                           commit="q", merger="m"), "t")
    rejected = _ev(ev.MergeRejected(task_id="t", head=f"{20:040d}", target="main",
                                    cause="check"), "t")
    queue = fold_merges([(1, request(20), 1), (2, merged, 2), (3, request(10), 3)])
    assert queue["t"].status == "merged" and queue["t"].commit == "q"
    assert queue["t"].last_seq == 3  # a verdict written now expects the latest sequence
    queue = fold_merges([(1, request(20), 1), (2, rejected, 2), (3, request(30), 3)])
    assert queue["t"].status == "rejected" and queue["t"].epoch == 20  # never reopened
    queue = fold_merges([(1, request(20), 1), (2, request(10), 2)])
    assert (queue["t"].status, queue["t"].epoch, queue["t"].seq) == ("queued", 20, 1)
    queue = fold_merges([(1, request(10), 1), (2, request(20), 2)])  # the successor's wins
    assert (queue["t"].epoch, queue["t"].head) == (20, f"{20:040d}")


# ------------------------------------------------------------- git, no NATS


async def test_fenced_holder_late_push_is_refused(tmp_path: Path) -> None:
    """Attempt 1 pushes WIP, attempt 2 takes the branch; attempt 1's late push is refused."""
    remote = make_remote(tmp_path)
    first = await WorkArea(str(remote), tmp_path / "a").open()
    second = await WorkArea(str(remote), tmp_path / "b").open()
    one = await start_attempt(first, task_id="t1", epoch=5, attempt=1, base="main")
    (one.path / "work.txt").write_text("one\n")
    assert await one.checkpoint("wip 1") is not None
    two = await start_attempt(second, task_id="t1", epoch=9, attempt=2, base="main")
    assert two.previous_head == one.pushed
    assert (two.path / "work.txt").read_text() == "one\n"  # continues from the branch
    (one.path / "work.txt").write_text("one, later\n")
    with pytest.raises(PushRefused):
        await one.checkpoint("late wip of the fenced holder")
    (two.path / "more.txt").write_text("two\n")
    head = await two.checkpoint("wip 2")
    assert sh("rev-parse", "refs/heads/cflow/t1", cwd=remote) == head
    log = sh("log", "--format=%s", "cflow/t1", cwd=remote).splitlines()
    assert "wip 1" in log and "wip 2" in log and "late wip of the fenced holder" not in log
    await one.close()
    await two.close()
    first.close()
    second.close()


async def test_two_attempts_in_one_clone_keep_their_own_branch(tmp_path: Path) -> None:
    """A fenced attempt and its successor in one worker's clone: the successor's take does
    not move the fenced worktree's branch under it."""
    remote = make_remote(tmp_path)
    area = await WorkArea(str(remote), tmp_path / "a").open()
    one = await start_attempt(area, task_id="t5", epoch=1, attempt=1, base="main")
    (one.path / "one.txt").write_text("one\n")
    head_one = await one.checkpoint("wip 1")
    two = await start_attempt(area, task_id="t5", epoch=2, attempt=2, base="main")
    assert await one.head() == head_one  # still its own commit
    assert sh("rev-parse", "--abbrev-ref", "HEAD", cwd=two.path) == "cflow/t5@2"
    await one.close()
    await two.close()
    assert sh("branch", "--list", "cflow/t5@*", cwd=area.repo) == ""  # no local branch left
    area.close()


async def test_a_rewritten_branch_is_not_pushed(tmp_path: Path) -> None:
    """An agent that resets its worktree cannot drop the commits pushed before."""
    from cflow.gitflow.git import GitError

    remote = make_remote(tmp_path)
    area = await WorkArea(str(remote), tmp_path / "a").open()
    one = await start_attempt(area, task_id="t6", epoch=1, attempt=1, base="main")
    (one.path / "kept.txt").write_text("kept\n")
    pushed = await one.checkpoint("wip 1")
    sh("reset", "--quiet", "--hard", one.base_head, cwd=one.path)
    (one.path / "other.txt").write_text("other\n")
    with pytest.raises(GitError, match="was rewritten"):
        await one.checkpoint("rewritten")
    assert sh("rev-parse", "cflow/t6", cwd=remote) == pushed
    await one.close()
    area.close()


async def test_a_hanging_network_git_is_killed_with_its_children(tmp_path: Path) -> None:
    """ls-remote through an ssh that never answers: a GitError at the timeout, and the
    ssh child (git's process group) is gone."""
    from cflow.gitflow.git import GitError, git_status

    ssh = tmp_path / "ssh"
    ssh.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/ssh.pid\nexec sleep 60\n")
    ssh.chmod(0o755)
    with pytest.raises(GitError, match=r"timed out after 1\.5 s"):
        await git_status("ls-remote", "ssh://nowhere/repo.git", timeout_s=1.5,
                         env={"GIT_SSH_COMMAND": str(ssh)})
    stat = Path(f"/proc/{int((tmp_path / 'ssh.pid').read_text())}/stat")
    for _ in range(100):  # SIGKILL is delivered at once; a zombie counts as gone
        if not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z":
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("git's ssh child outlived the timeout")


async def test_stale_areas_and_worktrees_are_cleaned_at_start(tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    root = tmp_path / "root"
    area = await WorkArea(str(remote), root).open()
    attempt = await start_attempt(area, task_id="t2", epoch=1, attempt=1, base="main")
    assert attempt.path.exists()
    first_path = area.path
    area.close()  # what kill -9 does to the lock
    again = await WorkArea(str(remote), root).open()
    assert again.path == first_path and str(attempt.path) in again.cleaned
    assert not attempt.path.exists() and again.live_worktrees() == []
    (root / "areas" / "stray.txt").write_text("not an area")  # a file among the areas
    other = await WorkArea(str(remote), root).open()  # a second live process: its own area
    assert other.path != again.path and (root / "areas" / "stray.txt").exists()
    again.close()
    other.close()


# --------------------------------------------------------- workers + merger


@pytest.mark.integration
async def test_four_workers_drain_twenty_tasks_all_merged(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    root = tmp_path / "areas"
    cmd = 'mkdir -p files && echo "$CFLOW_TASK_TITLE" > "files/$CFLOW_TASK_TITLE.txt"'
    tasks = [await swarm.tasks.create(f"f{i:02d}", lease_ttl_s=10.0) for i in range(20)]
    async with contextlib.AsyncExitStack() as stack:
        for i in range(4):
            await stack.enter_async_context(
                git_worker(nats_url, swarm_name, remote, root, f"w{i}", cmd))
        await stack.enter_async_context(merger(nats_url, swarm_name, remote, root))
        queue = await until_decided(swarm, 20)
    assert {r.status for r in queue.values()} == {"merged"}
    assert sorted(queue) == sorted(t.task_id for t in tasks)
    files = main_files(remote, tmp_path)
    assert {n for n in files if n.startswith("files/")} == {f"files/f{i:02d}.txt"
                                                            for i in range(20)}
    assert all(files[f"files/f{i:02d}.txt"] == f"f{i:02d}" for i in range(20))
    # one merge commit per task on main's first-parent line, each a distinct task
    merges = sh("log", "--first-parent", "--merges", "--format=%b", "main", cwd=remote)
    named = [line for line in merges.splitlines() if line.startswith("Cflow-Task: ")]
    assert sorted(n.split()[1] for n in named) == sorted(t.task_id for t in tasks)
    for t in tasks:
        assert (await swarm.tasks.get(t.task_id)).status == "completed"
    assert not any((root / "areas").glob("*/worktrees/*"))  # every worktree removed


@pytest.mark.integration
async def test_same_line_conflict_is_rejected_then_retried_on_new_target(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    remote = make_remote(tmp_path, {"shared.txt": "original\n"})
    root = tmp_path / "areas"
    seen = tmp_path / "conflicts.log"  # what each attempt was told (outside the worktree)
    cmd = ('printf "%s\\n" "$CFLOW_TASK_TITLE" > shared.txt; '
           f'echo "$CFLOW_TASK_ID:$CFLOW_CONFLICTS" >> {seen}')
    a = await swarm.tasks.create("alpha", priority=2)
    b = await swarm.tasks.create("beta", priority=1)
    async with git_worker(nats_url, swarm_name, remote, root, "w1", cmd) as w:
        await until(swarm, a.task_id, lambda s: s.status == "completed")
        await until(swarm, b.task_id, lambda s: s.status == "completed")
        async with merger(nats_url, swarm_name, remote, root):
            queue = await until_decided(swarm, 3)
        assert w.stats.completed == 3
    assert queue[a.task_id].status == "merged"  # higher priority first
    rejected = queue[b.task_id]
    assert rejected.status == "rejected" and rejected.cause == "conflict"
    assert "shared.txt" in rejected.output and "<<<<<<<" in rejected.output
    retry_id = rejected.retry_task
    assert retry_id is not None and queue[retry_id].status == "merged"
    told = dict(line.split(":", 1) for line in seen.read_text().splitlines())
    assert told[retry_id] == "shared.txt" and told[a.task_id] == told[b.task_id] == ""
    retry = await swarm.tasks.get(retry_id)
    assert retry.labels["cflow.branch"] == f"cflow/{b.task_id}"
    assert retry.body == b.body
    notes = [i.event.data for i in await swarm.log.entity_events("note", retry_id)]
    assert any(isinstance(n, ev.TaskNoted) and n.artifact == "merge"
               and "merge conflict in shared.txt" in n.text for n in notes)
    assert main_files(remote, tmp_path)["shared.txt"] == "beta"
    history = sh("log", "--format=%s", "main", cwd=remote)
    assert f"Merge cflow/{a.task_id}: alpha" in history
    assert f"Merge cflow/{b.task_id}: beta" in history  # the retry merged b's branch
    # analytics: the projection's SQL and the fold agree (2 merged, 1 conflict)
    projector = Projector(swarm.log, tmp_path / "p.duckdb")
    try:
        await projector.run(until_seq=await swarm.log.stream_last_seq())
        store = projector.store
        assert store is not None and projector.quarantined == 0

        def summary_row() -> dict[str, Any]:
            cur = store.con.execute(MERGES_SQL)
            return dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))

        row = await projector.db(summary_row)
    finally:
        await projector.close()
    summary = merge_summary(queue.values())
    assert (row["requests"], row["merged"], row["rejected"]) == (3, 2, 1)
    assert row["rejection_rate"] == summary["rejection_rate"] == round(1 / 3, 3)
    assert row["causes"] == "conflict=1" and summary["causes"] == {"conflict": 1}
    assert row["lead_time_max_s"] >= row["lead_time_median_s"] > 0


async def test_fenced_holder_requests_no_merge(swarm: Swarm, tmp_path: Path) -> None:
    """A holder whose claim moved on, with nothing new to push, writes no MergeRequested."""
    from cflow.worker.executor import TaskContext

    remote = make_remote(tmp_path)
    t = await swarm.tasks.create("fenced")
    first = await swarm.tasks.claim(t.task_id, agent="a1")
    assert first is not None
    await first.release("handed over")  # the successor claims: a1's epoch is stale
    second = await swarm.tasks.claim(t.task_id, agent="a2")
    assert second is not None and second.epoch != first.epoch
    exe = GitExecutor(SubprocessExecutor("echo done > done.txt"), swarm, str(remote),
                      area=WorkArea(str(remote), tmp_path / "a"))
    ctx = TaskContext(task_id=t.task_id, title="fenced", body="", attempt=1,
                      epoch=first.epoch, url="", swarm=swarm.name, agent="a1")
    try:
        outcome = await exe.run(ctx)
    finally:
        await exe.aclose()
    assert not outcome.ok and "no merge requested" in (outcome.error or "")
    assert [i.event.type for i in await swarm.log.entity_events("merge", t.task_id)] == []


@pytest.mark.integration
async def test_red_check_keeps_change_out_and_reopens_with_output(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    root = tmp_path / "areas"
    cmd = ('if [ -n "$CFLOW_PREVIOUS" ]; then echo good > value.txt; '
           'else echo bad > value.txt; fi')
    check = 'grep -q good value.txt || { echo "value.txt is $(cat value.txt), want good"; exit 3; }'
    t = await swarm.tasks.create("value")
    before = sh("rev-parse", "main", cwd=remote)
    async with git_worker(nats_url, swarm_name, remote, root, "w1", cmd), \
            merger(nats_url, swarm_name, remote, root, check=check):
        queue = await until_decided(swarm, 2)
    first = queue[t.task_id]
    assert first.status == "rejected" and first.cause == "check"
    assert "value.txt is bad, want good" in first.output and "exit 3" in first.output
    assert first.retry_task is not None
    assert queue[first.retry_task].status == "merged"
    retry = await swarm.tasks.get(first.retry_task)
    notes = [i.event.data for i in await swarm.log.entity_events("note", retry.task_id)]
    assert any(isinstance(n, ev.TaskNoted) and "value.txt is bad, want good" in n.text
               for n in notes)
    assert main_files(remote, tmp_path)["value.txt"] == "good"
    # the red merge never reached main: main went from `before` straight to the good merge
    assert first_parents(remote)[1] == before


async def test_rejection_secures_its_verdict_before_the_retry_exists(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    """A stale merger whose verdict CAS fails makes no retry; one killed between the verdict
    and the retry leaves it to the next holder, which creates it at takeover."""
    from cflow.leases import task_id_for_key

    remote = make_remote(tmp_path)
    heads = {}
    for name in ("stale", "orphan"):
        t = await swarm.tasks.create(name)
        lease = await swarm.tasks.claim(t.task_id, agent="w")
        assert lease is not None
        await lease.complete()
        heads[name] = t.task_id
        await swarm.log.append(ev.MergeRequested(task_id=t.task_id, epoch=lease.epoch,
                                                 branch=f"cflow/{t.task_id}", head="b" * 40),
                               t.task_id)
    stale = Merger(swarm, str(remote), area=WorkArea(str(remote), tmp_path / "m0"))
    stale.queue = await read_queue(swarm)
    request = stale.queue[heads["stale"]]
    await swarm.log.append(ev.Merged(task_id=request.task_id, head=request.head, target="main",
                                     previous="p", commit="q", merger="other"),
                           request.task_id, expected=request.last_seq)
    await stale._reject(request, "check", "red while another merger merged it")
    retry_of_stale = task_id_for_key(swarm.name, f"merge-retry-{request.task_id}-{'b' * 40}")
    assert (await read_queue(swarm))[request.task_id].status == "merged"
    assert retry_of_stale not in {t.task_id for t in await swarm.tasks.list()}
    # the verdict recorded, the merger killed before creating the retry it names
    orphan = (await read_queue(swarm))[heads["orphan"]]
    retry_id = task_id_for_key(swarm.name, f"merge-retry-{orphan.task_id}-{'b' * 40}")
    await swarm.log.append(ev.MergeRejected(task_id=orphan.task_id, head=orphan.head,
                                            target="main", cause="conflict", output="hunks",
                                            retry_task=retry_id),
                           orphan.task_id, expected=orphan.last_seq)
    async with merger(nats_url, swarm_name, remote, tmp_path / "m1"):
        retry = await until(swarm, retry_id, lambda s: s.status == "ready")
    assert retry.labels["cflow.origin"] == orphan.task_id
    notes = [i.event.data for i in await swarm.log.entity_events("note", retry_id)]
    assert [n.text for n in notes if isinstance(n, ev.TaskNoted) and n.artifact == "merge"] \
        == [f"merge of cflow/{orphan.task_id} into main rejected (conflict):\nhunks"]


@pytest.mark.integration
async def test_a_chain_rejected_max_rejections_times_fails_with_the_last_output(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    """A permanently red check: two rejections (--max-rejections 2), then no more retries."""
    from cflow.gitflow.merger import create_merge_gate

    remote = make_remote(tmp_path)
    root = tmp_path / "areas"
    t = await swarm.tasks.create("never green")
    gate = await create_merge_gate(swarm, t.task_id)
    async with git_worker(nats_url, swarm_name, remote, root, "w1",
                          'echo "$CFLOW_TASK_ID" >> value.txt'), \
            merger(nats_url, swarm_name, remote, root, check="echo always red; exit 1",
                   max_rejections=2):
        queue = await until_decided(swarm, 2)
        assert await until(swarm, gate, lambda s: s.status == "failed")
    first = queue[t.task_id]
    assert first.status == "rejected" and first.retry_task is not None
    last = queue[first.retry_task]
    assert last.status == "rejected" and last.retry_task is None
    assert last.output.startswith(f"{t.task_id} failed: 2 merges of its branch rejected")
    assert "always red" in last.output
    assert len(queue) == 2 and len(await swarm.tasks.list()) == 3  # task, one retry, gate


async def test_a_push_declined_by_a_hook_is_rejected_with_gits_line(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    """A pre-receive hook declines main: not a fence (no endless retry), rejected as `git`."""
    remote = make_remote(tmp_path)
    hook = remote / "hooks" / "pre-receive"
    hook.write_text('#!/bin/sh\nwhile read old new ref; do [ "$ref" = refs/heads/main ] && '
                    '{ echo "main is frozen" >&2; exit 1; }; done; exit 0\n')
    hook.chmod(0o755)
    (t,) = await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "frozen",
                          command="echo x > x.txt")
    async with merger(nats_url, swarm_name, remote, tmp_path / "m"):
        queue = await until_decided(swarm, 1, within=30)
    rejected = queue[t.task_id]
    assert rejected.status == "rejected" and rejected.cause == "git"
    assert "pre-receive hook declined" in rejected.output and "main is frozen" in rejected.output


async def test_bad_remote_is_one_clear_line(swarm: Swarm, tmp_path: Path) -> None:
    from cflow.gitflow.git import GitError

    exe = GitExecutor(SubprocessExecutor("true"), swarm, str(tmp_path / "nowhere.git"),
                      area=WorkArea(str(tmp_path / "nowhere.git"), tmp_path / "areas"))
    with pytest.raises(GitError) as err:
        await exe.check()
    assert "\n" not in str(err.value) and str(err.value).startswith("git ls-remote failed")
    await exe.aclose()
    remote = make_remote(tmp_path)
    exe = GitExecutor(SubprocessExecutor("true"), swarm, str(remote), base="trunk",
                      area=WorkArea(str(remote), tmp_path / "areas2"))
    with pytest.raises(GitError, match="has no branch 'trunk'"):
        await exe.check()
    await exe.aclose()


@pytest.mark.integration
async def test_git_demo_merges_every_task_and_prints_the_log(nats_url: str) -> None:
    from cflow.demo_git import GitDemoOptions, run_git_demo

    summary = await run_git_demo(GitDemoOptions(agents=1, tasks=1, conflicts=2, url=nats_url,
                                                json=True, timeout_s=90))
    assert summary["merged"] == 3 and summary["queued"] == 0
    log = summary["log"]
    assert isinstance(log, list) and len(log) == 4 and log[-1].endswith("initial")
    assert all(" Merge cflow/" in line for line in log[:3])
    assert summary["version"] in ('version = "1.1-alpha"', 'version = "1.1-beta"')


@pytest.mark.integration
async def test_dependents_of_a_merge_gate_wait_for_the_merge(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    from cflow.gitflow.merger import create_merge_gate

    remote = make_remote(tmp_path)
    root = tmp_path / "areas"
    a = await swarm.tasks.create("api")
    gate = await create_merge_gate(swarm, a.task_id)
    assert await create_merge_gate(swarm, a.task_id) == gate  # idempotent
    b = await swarm.tasks.create("client", depends_on=[gate])
    cmd = 'echo "$CFLOW_TASK_TITLE" > "$CFLOW_TASK_TITLE.txt"'
    async with git_worker(nats_url, swarm_name, remote, root, "w1", cmd):
        await until(swarm, a.task_id, lambda s: s.status == "completed")
        assert (await swarm.tasks.get(b.task_id)).status == "pending"  # completed, not merged
        async with merger(nats_url, swarm_name, remote, root):
            done = await until(swarm, b.task_id, lambda s: s.status == "completed")
    merged = [e for e in await swarm.log.entity_events("merge", a.task_id)
              if e.event.type == "Merged"]
    claimed = [e for e in await swarm.log.entity_events("task", b.task_id)
               if e.event.type == "TaskClaimed"]
    assert len(merged) == 1 and claimed[0].seq > merged[0].seq
    assert done.status == "completed"
    assert {"api.txt", "client.txt"} <= set(main_files(remote, tmp_path, f"cflow/{b.task_id}"))
