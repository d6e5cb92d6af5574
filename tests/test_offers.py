"""Work offers: one ready task to one claimer; offers never decide ownership."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from cflow import events as ev
from cflow import leases
from cflow.offers import band_of, band_token, cap_token, caps_token, eligible
from cflow.streams.client import api_request
from cflow.swarm import Swarm
from support import maintained


def test_bands_and_capability_sets_as_subject_tokens() -> None:
    assert [band_of(band_token(p)) for p in (-5, 0, 7)] == [-5, 0, 7]
    assert caps_token([]) == "any"
    assert caps_token(["py", "gpu", "py"]) == "gpu+py"
    odd = cap_token("needs.a dot")
    assert odd.startswith("h") and "." not in odd and " " not in odd
    assert cap_token("needs.a dot") == odd  # stable


def test_eligible_subjects_best_band_first_and_only_covered_sets() -> None:
    subjects = [f"cf.s.offer.{band_token(p)}.{caps}"
                for p, caps in ((0, "any"), (9, "gpu"), (5, "py"), (5, "gpu+py"), (-1, "any"))]
    assert eligible(subjects, ["py"]) == ["cf.s.offer.p5.py", "cf.s.offer.p0.any",
                                          "cf.s.offer.m1.any"]
    assert eligible(subjects, ["gpu", "py"])[:3] == ["cf.s.offer.p9.gpu", "cf.s.offer.p5.gpu+py",
                                                     "cf.s.offer.p5.py"]
    assert eligible(subjects, []) == ["cf.s.offer.p0.any", "cf.s.offer.m1.any"]


@pytest.mark.integration
async def test_priority_then_capabilities_decide_which_offer_a_claimer_gets(swarm: Swarm) -> None:
    low = await swarm.tasks.create("low", priority=1)
    gpu = await swarm.tasks.create("gpu only", priority=9, capabilities=["gpu"])
    high = await swarm.tasks.create("high", priority=5)
    first = await swarm.tasks.claim(agent="cpu")
    second = await swarm.tasks.claim(agent="cpu")
    assert first is not None and second is not None
    assert (first.task_id, second.task_id) == (high.task_id, low.task_id)
    assert await swarm.tasks.claim(agent="cpu") is None  # the gpu task is not for it
    third = await swarm.tasks.claim(agent="gpu-box", capabilities=["gpu"])
    assert third is not None and third.task_id == gpu.task_id


@pytest.mark.integration
async def test_a_stale_offer_is_refused_by_the_compare_and_set(swarm: Swarm) -> None:
    t = await swarm.tasks.create("taken by id")
    by_id = await swarm.tasks.claim(t.task_id, agent="direct")
    assert by_id is not None
    # Its offer is still queued: taking it must not claim the task a second time.
    assert await swarm.tasks.claim(agent="other") is None
    history = await swarm.tasks.history(t.task_id)
    assert [e.event.type for e in history].count("TaskClaimed") == 1


@pytest.mark.integration
async def test_a_retry_is_offered_again_after_its_backoff_not_before(swarm: Swarm) -> None:
    t = await swarm.tasks.create("flaky", backoff_initial_s=1.0)
    lease = await swarm.tasks.claim(agent="a")
    assert lease is not None
    await lease.fail("boom", retry=True)
    started = time.monotonic()
    assert await swarm.tasks.claim(agent="b") is None  # backing off: handed back
    again = await swarm.tasks.claim(agent="b", wait=10)
    waited = time.monotonic() - started
    assert again is not None and again.task_id == t.task_id and again.attempt == 2
    assert 0.8 <= waited < 4.0, waited


@pytest.mark.integration
async def test_a_ready_task_nobody_offered_is_offered_by_a_maintainer(
        nats_url: str, swarm_name: str, swarm: Swarm, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that died between its event and its offer strands nothing."""
    monkeypatch.setattr(leases, "OFFER_REPAIR_S", 0.5)
    monkeypatch.setattr(leases, "SWEEP_INTERVAL_S", 0.5)
    task_id = ev.new_id()
    await swarm.log.append(ev.TaskCreated(title="orphan"), task_id, expected=0)  # no offer
    assert await swarm.tasks.claim(agent="a") is None
    async with maintained(nats_url, swarm_name):
        lease = await swarm.tasks.claim(agent="a", wait=15)
    assert lease is not None and lease.task_id == task_id


@pytest.mark.integration
async def test_sixteen_claimers_share_the_offers_without_a_double_claim(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    ids = {(await swarm.tasks.create(f"t{i}", priority=i % 3)).task_id for i in range(48)}
    got: list[str] = []

    async def claimer(i: int) -> None:
        async with Swarm.connect(nats_url, swarm=swarm_name, agent=f"c{i}") as s:
            while (lease := await s.tasks.claim(agent=f"c{i}")) is not None:
                got.append(lease.task_id)
                await lease.complete("ok")

    await asyncio.gather(*(claimer(i) for i in range(16)))
    assert sorted(got) == sorted(ids)  # every task once, none twice


@pytest.mark.integration
async def test_an_offer_another_process_prefetched_is_still_claimable_at_once(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    for i in range(2):
        await swarm.tasks.create(f"t{i}")
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="b") as other:
        await other.tasks.offers.subjects(fresh=True)
        first = await swarm.tasks.claim(agent="a")
        assert first is not None
        # Completing pulls this process's next offer ahead of time (it usually claims
        # again at once) and holds it for a moment: another agent asking now, without
        # waiting, must still get that task rather than "nothing to claim".
        await first.complete("ok")
        second = await other.tasks.claim(agent="b")
        assert second is not None and second.task_id != first.task_id
        await second.complete("ok")


@pytest.mark.integration
async def test_a_holder_that_leaves_hands_back_the_offer_it_prefetched(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    """A holder that leaves right after its last task (``--max-tasks``) had pulled its
    next offer ahead of time; closing hands it back, so another claimer gets it at
    once instead of after the offer's ack wait (ACK_WAIT_S)."""
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="a") as leaving:
        first_id = (await swarm.tasks.create("first")).task_id
        first = await leaving.tasks.claim(agent="a")
        assert first is not None and first.task_id == first_id
        second_id = (await swarm.tasks.create("second")).task_id
        await first.complete("ok")  # pulls the offer of "second" ahead of time
    second = await swarm.tasks.claim(agent="b", wait=leases.offers_mod.ACK_WAIT_S / 2)
    assert second is not None and second.task_id == second_id
    await second.complete("ok")


DIES_HOLDING_AN_OFFER = """
import asyncio, os, signal, sys
from cflow import offers
from cflow.swarm import Swarm

offers.PREFETCH_HOLD_S = 3600.0  # it holds the offer until it dies, whatever the load

async def main(url, swarm):
    async with Swarm.connect(url, swarm=swarm, agent="doomed") as s:
        lease = await s.tasks.claim(agent="doomed")
        assert lease is not None and lease.task_id == sys.argv[3], lease
        await lease.complete("ok")  # pulls the next offer ahead of time
        pulled = await s.tasks.offers._pulled.get()  # its answer: the next offer
        assert not (pulled.headers or {}).get("Status"), pulled.headers
        print("holding", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(*sys.argv[1:3]))
"""


@pytest.mark.integration
async def test_an_offer_held_by_a_process_killed_9_is_claimable_within_the_ack_wait(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    """kill -9 leaves no process to hand back a prefetched offer: the server offers it
    again after the consumer's ack wait, which is short (a claim takes milliseconds
    between its fetch and its ack), so the task waits seconds, not half a minute."""
    first_id = (await swarm.tasks.create("first")).task_id
    second_id = (await swarm.tasks.create("second")).task_id
    child = subprocess.Popen([sys.executable, "-c", DIES_HOLDING_AN_OFFER, nats_url,
                              swarm_name, first_id], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        out, err = await asyncio.to_thread(child.communicate, timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert out.strip() == "holding" and child.returncode == -9, err
    killed = time.monotonic()
    # The ack wait (5 s), then an idle claimer's next look (IDLE_RECHECK_S, 2 s).
    second = await swarm.tasks.claim(agent="b", wait=8.0)
    assert second is not None and second.task_id == second_id
    assert time.monotonic() - killed <= 8.0
    await second.complete("ok")


@pytest.mark.integration
async def test_an_offer_consumer_made_with_the_old_ack_wait_gets_the_new_one(
        swarm: Swarm) -> None:
    """Swarms made when the ack wait was 30 s: a claimer's first use of a consumer
    brings its configuration up to date (JetStream updates a durable in place)."""
    from cflow import offers

    state = await swarm.tasks.create("t")
    subject = offers.offer_subject(swarm.name, state)
    name = offers.consumer_name(subject)
    desk = swarm.tasks.offers
    old = {"durable_name": name, "filter_subject": subject, "ack_policy": "explicit",
           "deliver_policy": "all", "ack_wait": 30 * 10**9, "max_ack_pending": -1,
           "max_waiting": 4096, "inactive_threshold": 3600 * 10**9}
    await api_request(swarm.nc, f"$JS.API.CONSUMER.CREATE.{desk.stream}.{name}",
                      {"stream_name": desk.stream, "config": old})
    lease = await swarm.tasks.claim(agent="a")
    assert lease is not None and lease.task_id == state.task_id
    info = await api_request(swarm.nc, f"$JS.API.CONSUMER.INFO.{desk.stream}.{name}", {})
    assert info["config"]["ack_wait"] == int(offers.ACK_WAIT_S * 1e9)
    await lease.complete("ok")


@pytest.mark.integration
async def test_an_idle_waiting_claim_does_not_poll(swarm: Swarm) -> None:
    """Nothing to claim: the claimer waits for a pushed offer and looks again only every
    IDLE_RECHECK_S, not in a loop (it once spun at ~80 requests/s: a backoff deadline
    in the past counted as 'due now')."""
    from cflow import offers

    await swarm.tasks.ensure_board()
    sent = swarm.nc.stats["out_msgs"]
    started = time.monotonic()
    assert await swarm.tasks.claim(agent="idle", wait=1.5) is None
    waited = time.monotonic() - started
    looks = waited / offers.IDLE_RECHECK_S + 2
    # each look: one STREAM.INFO and one offers subscription, plus the first look's setup
    assert swarm.nc.stats["out_msgs"] - sent <= 4 * looks + 10, swarm.nc.stats
