"""Every error a Claude Code user met, as the MCP Inspector meets it: `cfctl mcp` on stdio.

One real `cfctl mcp` process per test, driven by the SDK's stdio client (what the
Inspector is built on); the swarm is checked from the outside with the facade.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from cflow.errors import ReservationConflict
from cflow.mcp.faults import CODES
from cflow.swarm import Swarm
from test_mcp_stdio import START_S, agent_env, cfctl

pytestmark = pytest.mark.integration

ONE_LINE = re.compile(r"^[A-Z_]+: [^\n]+\. Hint: [^\n]+$")


def stdio(cli_env: dict[str, str], agent: str, *caps: str) -> Client:
    args = ["mcp", *(a for c in caps for a in ("--capability", c))]
    return Client(StdioServerParameters(command=cfctl(), args=args,
                                        env=agent_env(cli_env, agent)),
                  read_timeout_seconds=START_S)


async def ok(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    res = await client.call_tool(tool, args)
    assert not res.is_error, res.content[0].text  # type: ignore[union-attr]
    assert isinstance(res.structured_content, dict)
    return res.structured_content


async def refused(client: Client, tool: str, code: str, args: dict[str, Any]) -> str:
    res = await client.call_tool(tool, args)
    text: str = res.content[0].text  # type: ignore[union-attr]
    assert res.is_error, text
    assert ONE_LINE.match(text), text  # `CODE: message. Hint: ...`, one line
    assert text.startswith(f"{code}: "), text
    assert not any(w in text.lower() for w in ("pydantic", "http", "traceback", "validation "
                                                "error")), text
    assert not any(text.startswith(f"{o}: ") for o in CODES if o != code)
    return text


async def test_argument_errors_and_capabilities(cli_env: dict[str, str], nats_url: str,
                                                swarm_name: str) -> None:
    """One line `CODE: message. Hint: ...` for every mistake; capabilities on claims."""
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="boss") as boss, \
            stdio(cli_env, "errs-1", "py", "docs") as client:
        made = await ok(client, "task_create", title="argument errors")
        task_id = made["task"]["id"]
        text = await refused(client, "task_claim", "INVALID_ARGUMENT",
                             {"task_id": task_id, "wait": 5})  # wait_s misspelled
        assert "'wait'" in text and "wait_s" in text  # names the bad one and the right ones
        text = await refused(client, "task_claim", "INVALID_ARGUMENT", {"wait_s": "soon"})
        assert "wait_s" in text
        text = await refused(client, "task_update", "INVALID_ARGUMENT", {"task_id": task_id})
        assert "action" in text
        await refused(client, "task_update", "INVALID_ARGUMENT",
                      {"task_id": task_id, "action": "finish"})
        await refused(client, "no_such_tool", "INVALID_ARGUMENT", {})
        await refused(client, "task_find", "INVALID_ARGUMENT", {"limit": 0})

        # A mistyped epoch is the caller's mistake, not a lost lease.
        claim = await ok(client, "task_claim", task_id=task_id)
        text = await refused(client, "task_update", "INVALID_ARGUMENT",
                             {"task_id": task_id, "action": "complete",
                              "epoch": claim["epoch"] + 1000})
        assert str(claim["epoch"]) in text
        await refused(client, "task_update", "INVALID_ARGUMENT",  # below, never issued either
                      {"task_id": task_id, "action": "complete", "epoch": claim["epoch"] - 1})
        await refused(client, "task_update", "INVALID_ARGUMENT",
                      {"task_id": task_id, "action": "complete", "epoch": -1})
        done = await ok(client, "task_update", task_id=task_id, action="complete",
                        epoch=claim["epoch"], text="fine")
        assert done["status"] == "completed"
        # And a stale epoch of a finished claim is LEASE_LOST / INVALID_STATE, as before.
        res = await client.call_tool("task_update", {"task_id": task_id, "action": "complete",
                                                     "epoch": claim["epoch"]})
        assert res.is_error

        listed = await client.list_tools()
        for tool in listed.tools:  # every tool says what it does to the world
            ann = tool.annotations
            assert ann is not None and None not in (ann.read_only_hint, ann.destructive_hint,
                                                    ann.idempotent_hint), tool.name
        assert not (await ok(client, "task_find", status="ready"))["tasks"]
        nothing = await ok(client, "task_claim")
        assert nothing["claimed"] is False and "no ready work" in nothing["reason"]

        gpu = await boss.tasks.create("needs a gpu", capabilities=["gpu"])
        nothing = await ok(client, "task_claim")
        assert nothing["claimed"] is False and "gpu" in nothing["reason"]
        text = await refused(client, "task_claim", "INVALID_STATE", {"task_id": gpu.task_id})
        assert "gpu" in text
        assert (await boss.tasks.get(gpu.task_id)).status == "ready"  # untouched

        py = await boss.tasks.create("python work", capabilities=["py"], priority=5)
        docs = await boss.tasks.create("docs work", capabilities=["docs"])
        # The filter: only what needs at most these of my capabilities, best first.
        got = await ok(client, "task_claim", capabilities=["docs"])
        assert got["task"]["id"] == docs.task_id
        text = await refused(client, "task_claim", "INVALID_ARGUMENT",
                             {"capabilities": ["gpu"]})
        assert "gpu" in text
        text = await refused(client, "task_claim", "INVALID_STATE",
                             {"task_id": py.task_id, "capabilities": ["docs"]})
        assert "py" in text
        got = await ok(client, "task_claim")
        assert got["task"]["id"] == py.task_id

        prompt = await client.get_prompt("work_next", {"capability": "docs"})
        text = prompt.messages[0].content.text  # type: ignore[union-attr]
        assert 'task_claim with capabilities=["docs"]' in text




async def test_small_answers_notes_messages_and_paths(cli_env: dict[str, str], nats_url: str,
                                                      swarm_name: str) -> None:
    # `hook` writes as the session's agent, as the PostToolUse hook does.
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="peer") as peer, \
            Swarm.connect(nats_url, swarm=swarm_name, agent="msg-1") as hook, \
            stdio(cli_env, "msg-1") as client:
        huge = "x" * 200_000
        made = await client.call_tool("task_create", {"title": huge, "body": huge,
                                                      "labels": {"k": huge}})
        assert not made.is_error
        assert len(made.content[0].text) < 2_000  # type: ignore[union-attr]
        task_id = made.structured_content["task"]["id"]  # type: ignore[index]
        found = await client.call_tool("task_find", {"task_id": task_id})
        assert len(found.content[0].text) < 20_000  # type: ignore[union-attr]

        claim = await ok(client, "task_claim", task_id=task_id)
        await ok(client, "task_update", task_id=task_id, action="note",
                 text="the plan: split the parser first")
        for n in range(12):  # what the PostToolUse hook writes for each file edit
            await hook.tasks.note(task_id, "edited via Edit", epoch=claim["epoch"],
                                  paths=[f"src/f{n % 4}.py"])
        got = await ok(client, "task_find", task_id=task_id)
        assert [n["text"] for n in got["notes"]] == ["the plan: split the parser first"]
        assert got["edited_paths"] == [f"src/f{n}.py" for n in range(4)]
        assert json.dumps(got).count("edited via") == 0

        sent = await ok(client, "message", action="send", to="peer", text="taking the parser")
        (got,) = await peer.messages.inbox("peer")
        assert got.id == sent["sent"] and got.sender == "msg-1"
        reply = await peer.messages.send("msg-1", "fine, I keep the lexer", ack_required=True)
        inbox = await ok(client, "message", action="inbox", wait_s=10)
        assert [(m["id"], m["from"], m["ack"]) for m in inbox["messages"]] == [
            (reply, "peer", True)]
        await ok(client, "message", action="ack", message_id=reply)
        assert not await peer.messages.overdue(older_than_s=0.0)
        await refused(client, "message", "INVALID_ARGUMENT", {"action": "send", "to": "peer"})

        held = await ok(client, "paths", action="reserve", patterns=["src/parser/**"])
        mine = await ok(client, "paths", action="list")
        assert [(r["owner"], r["patterns"]) for r in mine["reservations"]] == [
            ("msg-1", ["src/parser/**"])]
        with pytest.raises(ReservationConflict):
            await peer.reservations.reserve(["src/parser/grammar.py"])
        released = await ok(client, "paths", action="release")
        assert released["released"] == [held["reserved"]]
        assert await peer.reservations.reserve(["src/parser/grammar.py"])


async def test_answers_from_cached_state_say_so(nats_url: str, swarm_name: str) -> None:
    """An outage: what the adapter still answers from its cached board is marked stale."""
    from faults import Proxy
    from test_mcp_tools import mcp_client

    with Proxy(nats_url) as proxy:
        async with mcp_client(proxy.url, swarm_name, "stale-1") as (client, adapter):
            await ok(client, "task_create", title="seen before the outage")
            before = await ok(client, "task_find")
            assert "stale" not in before and len(before["tasks"]) == 1
            proxy.down()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while adapter.swarm.nc.is_connected:  # the client notices the cut connection
                assert loop.time() < deadline, "client never noticed the outage"
                await asyncio.sleep(0.05)
            during = await ok(client, "task_find")
            assert during["tasks"] == before["tasks"] and "outage" in during["stale"]
            status = await ok(client, "swarm_status")
            assert "outage" in status["stale"] and status["queue"] == {"ready": 1}
            proxy.heal()
            while not adapter.swarm.nc.is_connected:
                assert loop.time() < deadline + 20, "client never reconnected"
                await asyncio.sleep(0.05)
            assert "stale" not in await ok(client, "task_find")


async def test_timed_out_update_keeps_the_lease(nats_url: str, swarm_name: str) -> None:
    """A task_update that times out ("may have been stored; retry is safe") keeps renewing
    the lease, so the retry still holds it; LEASE_LOST does stop renewing."""
    from faults import Proxy
    from test_mcp_tools import mcp_client

    with Proxy(nats_url) as proxy:
        async with mcp_client(proxy.url, swarm_name, "upd-1") as (client, adapter):
            await ok(client, "task_create", title="finish me")
            claim = await ok(client, "task_claim")
            task_id = claim["task"]["id"]
            adapter.swarm.log.retry_s, adapter.swarm.log.request_timeout_s = 1.0, 0.5  # fast
            proxy.blackhole()
            res = await client.call_tool("task_update", {"task_id": task_id,
                                                         "action": "complete"})
            text: str = res.content[0].text  # type: ignore[union-attr]
            assert res.is_error and text.startswith("BACKEND_UNAVAILABLE: "), text
            assert adapter.held(task_id) is not None  # still renewed
            proxy.heal()
            done = await ok(client, "task_update", task_id=task_id, action="complete")
            assert done["status"] == "completed" and adapter.held(task_id) is None
