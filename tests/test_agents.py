"""Agent registry and presence against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from cflow import events as ev
from cflow.agents import AgentInfo, capabilities_of, fold_agent
from cflow.errors import InvalidInput, NotFound
from cflow.streams import StoredEvent, names
from cflow.swarm import Swarm


def _event(data: ev.EventData, name: str = "a1") -> ev.Event:
    return ev.make_event(data, swarm="s", entity_id=name, hlc="0" * 32, actor=name)


def test_fold_agent_pure() -> None:
    s = fold_agent(None, 1, _event(ev.AgentRegistered(name="a1", capabilities=("py",))))
    assert s.status == "online" and s.capabilities == ("py",) and s.registrations == 1
    s = fold_agent(s, 2, _event(ev.AgentStatusChanged(status="busy", task_id="t1")))
    assert (s.status, s.task_id, s.seq, s.events) == ("busy", "t1", 2, 2)
    s = fold_agent(s, 3, _event(ev.AgentDeregistered(reason="bye")))
    assert s.status == "offline" and s.deregistered and s.task_id is None
    with pytest.raises(InvalidInput, match="not an agent event"):
        fold_agent(s, 4, ev.make_event(ev.TaskReady(), swarm="s", entity_id="a1",
                                       hlc="0" * 32, actor="x"))


def test_capabilities_of() -> None:
    assert capabilities_of(["py,go", "py", " rust "]) == ("go", "py", "rust")


SWARM_AGENT = "observer"  # the conftest `swarm` fixture acts as this agent


@contextlib.asynccontextmanager
async def observer(nats_url: str, swarm_name: str, name: str) -> AsyncIterator[Swarm]:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent=name) as s:
        task = asyncio.create_task(s.agents.maintain())
        try:
            yield s
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def agent_events(swarm: Swarm, name: str) -> list[ev.Event]:
    items = await swarm.log.read(names.event_subject(swarm.name, "agent", name))
    return [i.event for i in items if isinstance(i, StoredEvent)]


async def wait_status(swarm: Swarm, name: str, status: str, within: float = 20.0,
                      reason: str | None = None) -> AgentInfo:
    """Follow the agent's subject (push) until its folded status is ``status``."""
    state: AgentInfo | None = None
    agen = swarm.log.follow(names.event_subject(swarm.name, "agent", name))
    try:
        async with asyncio.timeout(within):
            async for item in agen:
                if isinstance(item, StoredEvent):
                    state = fold_agent(state, item.seq, item.event)
                    if state.status == status and reason in (None, state.reason):
                        return state
    finally:
        await agen.aclose()
    raise AssertionError("unreachable")


@pytest.mark.integration
async def test_register_list_get_and_clean_exit(swarm: Swarm) -> None:
    agent = await swarm.agents.register("w1", ["py", "go"], {"zone": "a"})
    async with agent.present():
        info = await swarm.agents.get("w1")
        assert info.status == "online" and info.present and info.capabilities == ("go", "py")
        assert info.labels == {"zone": "a"} and info.runtime == "worker"
        assert await swarm.agents.set_status("w1", "busy", "t1")
        assert not await swarm.agents.set_status("w1", "busy", "t1")  # unchanged: skipped
        assert await swarm.agents.set_status("w1", "idle")
        listed = await swarm.agents.list()
        assert [a.name for a in listed] == ["w1"] and listed[0].status == "idle"
    info = await swarm.agents.get("w1")
    assert info.status == "offline" and info.deregistered and not info.present
    types = [e.type for e in await agent_events(swarm, "w1")]
    assert types == ["AgentRegistered", "AgentStatusChanged", "AgentStatusChanged",
                     "AgentDeregistered"]


@pytest.mark.integration
async def test_bad_names_and_unknown_agent(swarm: Swarm) -> None:
    with pytest.raises(InvalidInput, match="agent name"):
        await swarm.agents.register("no.dots")
    with pytest.raises(NotFound, match="agent not found"):
        await swarm.agents.get("ghost")
    with pytest.raises(InvalidInput, match="agent status"):
        await swarm.agents.set_status("ghost", "sleeping")  # type: ignore[arg-type]


@pytest.mark.integration
async def test_expired_presence_is_marked_offline_once(
        swarm: Swarm, nats_url: str, swarm_name: str) -> None:
    # Two observers race on the same marker; exactly one offline event results.
    async with observer(nats_url, swarm_name, "obs1") as o1, \
            observer(nats_url, swarm_name, "obs2") as o2:
        async with Swarm.connect(nats_url, swarm=swarm_name, agent="doomed") as victim:
            agent = await victim.agents.register("doomed")
            await agent._put_presence()  # presence with no renewal: the process "dies"
            agent.ttl_s = 1.0
            await agent._put_presence()
        state = await wait_status(swarm, "doomed", "offline")
        assert state.reason == "presence expired"
        # Let the second observer finish its attempt, then count.
        await o1.agents.sweep()
        await o2.agents.sweep()
    events = await agent_events(swarm, "doomed")
    offline = [e for e in events if isinstance(e.data, ev.AgentStatusChanged)
               and e.data.status == "offline"]
    assert len(offline) == 1
    assert offline[0].actor in ("obs1", "obs2")


@pytest.mark.integration
async def test_paused_agent_comes_back_online(
        swarm: Swarm, nats_url: str, swarm_name: str) -> None:
    async with observer(nats_url, swarm_name, "obs"):
        agent = await swarm.agents.register("sleepy")
        async with agent.present(ttl_s=1.0, renew_s=0.3):
            # Simulate a pause: renewals block until the key has expired.
            gate = asyncio.Event()
            renew = agent._put_presence

            async def paused() -> bool:
                await gate.wait()
                return await renew()

            agent._put_presence = paused  # type: ignore[method-assign]
            await wait_status(swarm, "sleepy", "offline")
            gate.set()
            back = await wait_status(swarm, "sleepy", "online", reason="presence restored")
            assert back.reason == "presence restored" and agent.lapses >= 1
            assert (await swarm.agents.get("sleepy")).present


@pytest.mark.integration
async def test_sweep_marks_agents_without_presence(swarm: Swarm) -> None:
    await swarm.agents.register("never-present")
    assert await swarm.agents.sweep() == 1
    assert (await swarm.agents.get("never-present")).status == "offline"
    assert await swarm.agents.sweep() == 0


CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


def cfctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CFCTL, *args], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.integration
async def test_cli_agent_register_list_show(swarm: Swarm, cli_env: dict[str, str]) -> None:
    reg = await asyncio.to_thread(cfctl, cli_env, "agent", "register", "cli-agent",
                                  "-c", "py,go", "--label", "team=core")
    assert reg.returncode == 0, reg.stderr
    assert reg.stdout.strip() == "registered cli-agent (capabilities: go, py)"
    t = await swarm.tasks.create("held")
    lease = await swarm.tasks.claim(agent="cli-agent")
    assert lease is not None
    listed = await asyncio.to_thread(cfctl, cli_env, "--json", "agent", "list")
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["capabilities"], r["labels"]) for r in rows] == [
        ("cli-agent", ["go", "py"], {"team": "core"})]
    human = await asyncio.to_thread(cfctl, cli_env, "agent", "list")
    assert "cli-agent" in human.stdout and "go,py" in human.stdout
    shown = json.loads((await asyncio.to_thread(cfctl, cli_env, "--json", "agent", "show",
                                                "cli-agent")).stdout)
    assert shown["leases"] == [{"task_id": t.task_id, "title": "held", "epoch": lease.epoch,
                                "attempt": 1}]
    assert shown["history"][0]["type"] == "AgentRegistered"
    await lease.complete("ok")
    text = (await asyncio.to_thread(cfctl, cli_env, "agent", "show", "cli-agent")).stdout
    assert "1 completed, 0 failed" in text and "AgentRegistered" in text
    missing = await asyncio.to_thread(cfctl, cli_env, "agent", "show", "ghost")
    assert missing.returncode == 5 and missing.stderr.strip() == "error: agent not found: ghost"
