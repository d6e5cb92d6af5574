"""`cfctl merge-queue --mode rebase`: linear history, a conflict retried (its merge commit
squashed), the merger killed -9 mid-check. Real git, real NATS, a real merger process."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.gitflow.merger import read_queue
from cflow.swarm import Swarm
from test_gitflow import (
    finished,
    git_worker,
    main_files,
    make_remote,
    merger,
    sh,
    until_decided,
)
from test_gitflow_chaos import cli_root, kill_pid, merge_events
from test_worker import CFCTL, stop, wait_file

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

# A writes its own file; B and C both rewrite shared.txt (C conflicts once B is in).
EDIT = ('case "$CFLOW_TASK_TITLE" in A) echo A > A.txt;; '
        '*) printf "%s\\n" "$CFLOW_TASK_TITLE" > shared.txt;; esac')


async def test_rebase_mode_linear_history_conflict_retry_and_merger_killed(
        swarm: Swarm, cli_env: dict[str, str], nats_url: str, swarm_name: str,
        tmp_path: Path) -> None:
    remote = make_remote(tmp_path, {"shared.txt": "original\n"})
    a, b, c = await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "A", "B",
                             "C", command=EDIT, priorities=(3, 2, 1))
    count, checking = tmp_path / "count", tmp_path / "checking"
    check = (f'n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; '
             f'if [ $n = 2 ]; then echo $$ > {checking}; exec sleep 60; fi')  # B's check hangs
    heads = [sh("rev-parse", "main", cwd=remote)]
    with open(tmp_path / "m1.log", "ab") as out:
        proc = subprocess.Popen([*CFCTL, "merge-queue", "--repo", str(remote), "--mode",
                                 "rebase", "--check", check, "--lease-ttl", "2", "--name", "m1"],
                                env=cli_env, stdout=subprocess.DEVNULL, stderr=out)
    check_pid = None
    try:
        check_pid = int(await wait_file(checking, within=30))
        heads.append(sh("rev-parse", "main", cwd=remote))  # A, fast-forwarded
        proc.kill()  # kill -9 mid-check of B
        proc.wait(10)
        kill_pid(check_pid)
        # m2 adopts m1's clone and worktree; C conflicts with B, its retry merges the new
        # target in (a merge commit on the branch) and is squashed onto main
        async with merger(nats_url, swarm_name, remote, cli_root(cli_env, remote), name="m2",
                          check=check, lease_ttl_s=2.0, mode="rebase"), \
                git_worker(nats_url, swarm_name, remote, tmp_path / "w2", "w2", EDIT):
            queue = await until_decided(swarm, 4, within=40)
    finally:
        stop(proc)
        if check_pid is not None:
            kill_pid(check_pid)
    assert heads[1] != heads[0]
    assert [queue[t.task_id].status for t in (a, b, c)] == ["merged", "merged", "rejected"]
    retry = queue[c.task_id].retry_task
    assert retry is not None and queue[retry].status == "merged"
    merged = Counter(e.entity_id for e in await merge_events(swarm) if e.type == "Merged")
    assert merged == Counter({a.task_id: 1, b.task_id: 1, retry: 1})  # none merged twice
    for old in heads:  # the target never lost a commit
        subprocess.run(["git", "merge-base", "--is-ancestor", old, "main"], cwd=remote,
                       check=True)
    assert sh("rev-list", "--merges", "main", cwd=remote) == ""  # linear
    body = sh("log", "--format=%B", "main", cwd=remote)
    for task_id in (a.task_id, b.task_id, retry):  # replayed (or squashed) with trailers
        assert f"Cflow-Task: {task_id}" in body
    assert f"(cflow/{c.task_id}, squashed)" in body
    files = main_files(remote, tmp_path)
    assert files["A.txt"] == "A" and files["shared.txt"] == "C"



async def test_rebase_mode_records_a_push_that_landed_before_the_merger_died(
        swarm: Swarm, nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    """The intent's rebased commits reached the target, the Merged record did not: the
    next merger records it (the head itself is not in the target) and pushes nothing."""
    remote = make_remote(tmp_path, {"shared.txt": "original\n"})
    (t,) = await finished(swarm, nats_url, swarm_name, remote, tmp_path / "w", "T",
                          command=EDIT)
    clone = tmp_path / "dead"
    sh("clone", "--quiet", str(remote), str(clone))
    (clone / "other.txt").write_text("moved on\n")  # main moved since the branch started
    sh("add", "other.txt", cwd=clone)
    sh("commit", "--quiet", "-m", "other", cwd=clone)
    sh("push", "--quiet", "origin", "main", cwd=clone)
    before = sh("rev-parse", "main", cwd=clone)
    sh("checkout", "--quiet", "--detach", f"origin/cflow/{t.task_id}", cwd=clone)
    sh("rebase", "--quiet", "main", cwd=clone)
    rebased, tree = sh("rev-parse", "HEAD", cwd=clone), sh("rev-parse", "HEAD^{tree}", cwd=clone)
    request = (await read_queue(swarm))[t.task_id]
    await swarm.log.append(ev.MergeStarted(task_id=t.task_id, head=request.head, target="main",
                                           previous=before, commit=rebased, tree=tree,
                                           merger="m0"), t.task_id, expected=request.last_seq)
    sh("push", "--quiet", "origin", "HEAD:main", cwd=clone)  # the dead merger's push landed
    async with merger(nats_url, swarm_name, remote, tmp_path / "m", mode="rebase") as m:
        queue = await until_decided(swarm, 1)
    assert queue[t.task_id].status == "merged" and queue[t.task_id].commit == rebased
    assert m.stats.recovered == 1 and sh("rev-parse", "main", cwd=remote) == rebased
