"""Clock skew: one worker's wall clock 10 minutes ahead or behind (libfaketime).

Deadlines come from server time, never from a client's wall clock (issue 14 #2).
With one skewed worker among three, and a skewed holder that fails a task:

- every task completes exactly once;
- no healthy claim is reaped (no ``TaskLeaseExpired`` but the one of the holder
  we kill);
- a task failed by the skewed holder is retried after about its backoff, not
  hidden behind a ``not_before`` ten minutes away;
- events of a task keep their order in HLC (a lagging node does not stamp a
  claim before the creation it follows);
- after kill -9 of the skewed holder, the task is claimable again within about
  one TTL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.swarm import Swarm
from cflow.tasks import TaskState
from faults import (
    ExecutionLog,
    WorkerProcess,
    by_task,
    completions,
    fleet,
    of_type,
    require_faketime,
    skewed_env,
    task_events,
    timeline,
)
from support import until

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SKEW_S = 600
TTL_S = 3.0
BACKOFF_S = 1.0


async def reach(s: Swarm, task_id: str, predicate: Callable[[TaskState], bool], what: str,
                within: float, workers: list[WorkerProcess]) -> TaskState:
    """``until`` with the facts on timeout: the task's events and the workers' logs."""
    try:
        return await until(s, task_id, predicate, within=within)
    except TimeoutError:
        history = timeline(await s.tasks.history(task_id))
        logs = "\n".join(f"--- {w.name} ({'alive' if w.alive else 'exited'}):\n"
                         f"{w.output()[-1500:]}" for w in workers)
        raise AssertionError(f"{what}: not within {within} s\n{history}\n{logs}") from None


@pytest.mark.parametrize("skew", [SKEW_S, -SKEW_S], ids=["ahead", "behind"])
async def test_one_skewed_worker_changes_no_deadline(
        skew: int, nats_url: str, swarm_name: str, cli_env: dict[str, str],
        tmp_path: Path) -> None:
    require_faketime()
    log = ExecutionLog(tmp_path)
    skewed = skewed_env(cli_env, skew)
    cmd = log.command(1.0)
    # s1: a skewed holder that fails one task and leaves (--max-tasks 1);
    # s2: a skewed worker among two healthy ones, the one killed at the end.
    s1 = WorkerProcess("s1", skewed, cmd, tmp_path, "--max-tasks", "1",
                       capabilities=["flaky"], drain_grace=1.0)
    s2 = WorkerProcess("s2", skewed, cmd, tmp_path, capabilities=["work", "s2"],
                       concurrency=2, drain_grace=1.0)
    healthy = [WorkerProcess(f"h{i}", cli_env, cmd, tmp_path, capabilities=["work"],
                             concurrency=2, drain_grace=1.0) for i in (1, 2)]
    retry = {"lease_ttl_s": TTL_S, "max_attempts": 3, "backoff_initial_s": BACKOFF_S,
             "backoff_max_s": BACKOFF_S}
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="chaos") as s:
        workers = [s1, s2, *healthy]
        with fleet(workers, log):
            await asyncio.gather(*(w.wait_ready() for w in workers))

            # 1. The skewed holder fails a task with retry: the retry is due after the
            #    backoff on the server's clock, for a healthy claimer too.
            flaky = await s.tasks.create("flaky", body=log.body(0.5, fail_attempts=1),
                                         capabilities=["flaky"], **retry)
            failed = await reach(s, flaky.task_id,
                                 lambda st: st.attempt >= 1 and st.status != "claimed",
                                 "the skewed holder fails its task", 15, workers)
            failed_at = time.monotonic()
            assert failed.status == "ready", timeline(await s.tasks.history(flaky.task_id))
            retried = await s.tasks.claim(agent="rescuer", capabilities=["flaky"],
                                          wait=BACKOFF_S + 6)
            retry_s = time.monotonic() - failed_at
            if retried is None or retried.task_id != flaky.task_id:
                raise AssertionError(
                    f"the task failed by a holder {skew:+d} s off was not claimable within "
                    f"{BACKOFF_S + 6:g} s (backoff {BACKOFF_S:g} s): claimed "
                    f"{retried and retried.task_id}, server time "
                    f"{await s.log.server_time_ms()}, the task now "
                    f"{await s.tasks.get(flaky.task_id)}\n"
                    f"{timeline(await s.tasks.history(flaky.task_id))}\n" + "\n".join(
                        f"--- {w.name}:\n{w.output()[-1500:]}" for w in workers))
            await retried.complete("second time lucky")

            # 2. Ordinary work shared by the skewed worker and two healthy ones.
            work = [(await s.tasks.create(
                f"work {k}", body=log.body(1.0), capabilities=["work", "s2"] if k % 3 == 0
                else ["work"], **retry)).task_id for k in range(9)]
            work_deadline = time.monotonic() + 20
            for task_id in work:
                await reach(s, task_id, lambda st: st.status == "completed", "work done",
                            max(0.1, work_deadline - time.monotonic()), workers)
            healthy_phase = await task_events(s.log)

            # 3. kill -9 the skewed worker while it holds a long task.
            doomed = await s.tasks.create("doomed", body=log.body(30.0),
                                          capabilities=["work", "s2"], **retry)
            [run] = await log.wait(
                lambda runs: [r for r in runs if r.task_id == doomed.task_id], 10,
                "s2 runs the long task")
            await asyncio.sleep(max(0.0, run.start + 1.5 - time.monotonic()))  # renewed
            s2.kill9()
            killed_at = time.monotonic()
            rescued = await s.tasks.claim(agent="rescuer", capabilities=["work", "s2"],
                                          wait=TTL_S * 3 + 2)
            reclaim_s = time.monotonic() - killed_at
            assert rescued is not None and rescued.task_id == doomed.task_id, (
                f"the killed skewed holder's task was not reclaimed within {TTL_S * 3 + 2:g} s")
            await rescued.complete("rescued")
        items = await task_events(s.log)

    history = by_task(items)
    all_ids = [flaky.task_id, *work, doomed.task_id]
    print(f"\nskew {skew:+d} s: retry after {retry_s:.1f} s (backoff {BACKOFF_S:g} s); "
          f"reclaim after kill -9 {reclaim_s:.1f} s (TTL {TTL_S:g} s); executions "
          f"by s2 {sum(1 for r in log.executions() if r.agent == 's2')}")
    healthy_expiries = [(i.event.entity_id, i.event.data) for i in
                        of_type(healthy_phase, ev.TaskLeaseExpired)]
    assert healthy_expiries == [], "healthy claims reaped:\n" + "\n".join(
        timeline(history[t]) for t, _ in healthy_expiries)
    assert completions(items) == dict.fromkeys(all_ids, 1), {
        t: timeline(history.get(t, [])) for t in all_ids}
    expiries = of_type(items, ev.TaskLeaseExpired)
    assert [(i.event.entity_id, i.event.data.owner) for i in expiries] == [  # type: ignore[attr-defined]
        (doomed.task_id, "s2")], timeline(expiries)
    for task_id in all_ids:
        stamps = [i.event.hlc for i in history[task_id]]
        assert stamps == sorted(stamps), f"HLC order broken:\n{timeline(history[task_id])}"
    assert any(r.agent == "s2" for r in log.executions() if r.task_id in work)
    assert retry_s <= BACKOFF_S + 1.5, f"retry after {retry_s:.1f} s, backoff {BACKOFF_S:g} s"
    assert reclaim_s <= 1.2 * TTL_S + 1.0, f"reclaim after {reclaim_s:.1f} s, TTL {TTL_S:g} s"
    assert log.max_overlap() <= TTL_S + 1.0, log.overlaps()[:3]
