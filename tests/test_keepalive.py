"""The shared keep-alive loop: pure timing with fake renewals, then presence and
reservation holders behind a black-holed connection against a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from cflow.errors import ReservationLost, Unavailable
from cflow.keepalive import Holding, kept_alive, renewal
from cflow.lease_policy import LeasePolicy
from cflow.reservations import Reservation
from cflow.swarm import Swarm
from faults import Proxy

# ---------------------------------------------------------- the loop, no server


def holding(ttl_s: float = 1.0) -> Holding:
    return Holding(LeasePolicy(ttl_s), time.monotonic())


def counting(op: Callable[[int], Awaitable[None]], held: Holding
             ) -> tuple[list[float], Callable[[], Awaitable[None]]]:
    """A renewal recorded on ``held`` that logs when each attempt started."""
    calls: list[float] = []

    async def renew() -> None:
        calls.append(time.monotonic())
        await renewal(held, lambda: op(len(calls)), refused=(ReservationLost,))

    return calls, renew


async def test_renews_every_interval_and_is_never_lost_while_renewals_succeed() -> None:
    held = holding(1.0)

    async def ok(_: int) -> None:
        return None

    calls, renew = counting(ok, held)
    started = time.monotonic()
    async with kept_alive(held, renew, name="ok", interval_s=0.1):
        await asyncio.sleep(1.5)  # time passing is the point: 1.5 TTLs
    assert not held.lost.is_set()
    assert len(calls) >= 10
    assert held.deadline > started + 1.5  # pushed by every renewal


async def test_a_transient_failure_is_retried_quickly_and_the_lease_kept() -> None:
    held = holding(3.0)  # renew every 1 s, deadline 2.5 s after a renewal
    fourth = asyncio.Event()

    async def flaky(n: int) -> None:
        if n == 4:
            fourth.set()
        if n in (1, 2):
            raise Unavailable("nats away")

    calls, renew = counting(flaky, held)
    async with kept_alive(held, renew, name="flaky"):
        await asyncio.wait_for(fourth.wait(), 5)
    assert not held.lost.is_set()
    # The retries came after the short backoff (0.2 s, then 0.4 s), not after 1 s each.
    assert calls[1] - calls[0] < 0.5 and calls[2] - calls[1] < 0.7
    assert calls[3] - calls[2] > 0.9  # back to the normal interval once renewed
    assert held.clock.failures == 0  # reset by the renewal that succeeded


async def test_a_renewal_hanging_on_a_dead_connection_loses_it_before_the_ttl() -> None:
    held = holding(1.2)
    lost_at: list[float] = []

    async def hang(_: int) -> None:
        await asyncio.Event().wait()

    _, renew = counting(hang, held)
    started = time.monotonic()
    async with kept_alive(held, renew, name="hang", interval_s=0.2,
                          on_lost=lambda: lost_at.append(time.monotonic())):
        await asyncio.wait_for(held.lost.wait(), 3)
        await asyncio.sleep(0)  # on_lost runs right after the loop ends
    assert len(lost_at) == 1
    assert lost_at[0] - started <= 1.2 - held.clock.policy.holder_margin_s + 0.1
    assert held.lost_reason is not None and "no successful renewal" in held.lost_reason


async def test_a_refused_renewal_loses_it_at_once_with_the_reason() -> None:
    held = holding(5.0)
    told: list[str | None] = []

    async def refuse(_: int) -> None:
        raise ReservationLost("r1", "released")

    _, renew = counting(refuse, held)
    async with kept_alive(held, renew, name="refused", interval_s=0.1,
                          on_lost=lambda: told.append(held.lost_reason)):
        await asyncio.wait_for(held.lost.wait(), 2)
        await asyncio.sleep(0)
    assert told == ["released"]


async def test_leaving_the_block_first_does_not_call_on_lost() -> None:
    held = holding(1.0)
    told: list[bool] = []

    async def ok(_: int) -> None:
        return None

    _, renew = counting(ok, held)
    async with kept_alive(held, renew, name="ok", on_lost=lambda: told.append(True)):
        pass
    assert told == [] and not held.lost.is_set()


# ------------------------------------------- holders behind a black-holed connection

@pytest.mark.integration
async def test_a_reservation_holder_cut_off_is_told_lost_within_the_ttl(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    ttl = 2.0
    with Proxy(nats_url, name="reservation-holder") as proxy:
        async with Swarm.connect(proxy.url, swarm=swarm_name, agent="holder") as cut_off:
            res = cut_off.reservations
            held = await res.reserve(["src/*"], ttl_s=ttl)
            lost: asyncio.Future[tuple[float, Reservation]] = \
                asyncio.get_running_loop().create_future()

            def told(r: Reservation) -> None:
                if not lost.done():
                    lost.set_result((time.monotonic(), r))

            async with res.keep_alive(held, interval_s=0.3, on_lost=told):
                proxy.blackhole()  # from the reservation's own write, no renewal gets through
                cut = time.monotonic()
                told_at, last = await asyncio.wait_for(lost, ttl + 2)
                # Told within the TTL of the cut, and before the server let it go:
                # nobody else could have reserved these paths yet.
                assert told_at - cut < ttl
                assert held.id in [r.id for r in await swarm.reservations.list()]
                assert last.id == held.id
                proxy.heal()


@pytest.mark.integration
async def test_a_presence_holder_cut_off_is_told_lost_within_the_ttl(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    ttl = 2.0
    with Proxy(nats_url, name="presence-holder") as proxy:
        async with Swarm.connect(proxy.url, swarm=swarm_name, agent="present") as cut_off:
            agent = await cut_off.agents.register("present")
            lost: asyncio.Future[float] = asyncio.get_running_loop().create_future()

            def told(_: object) -> None:
                if not lost.done():
                    lost.set_result(time.monotonic())

            async with agent.present(ttl_s=ttl, renew_s=0.3, on_lost=told):
                assert agent.presence is not None
                proxy.blackhole()  # no renewal gets through
                cut = time.monotonic()
                told_at = await asyncio.wait_for(lost, ttl + 2)
                assert told_at - cut < ttl
                assert agent.presence.lost.is_set()
                # The server has not expired the key yet: we knew first.
                assert (await swarm.agents.get("present")).present
                proxy.heal()
