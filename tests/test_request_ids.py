"""Client request ids make create and memory writes safe to retry (issue 14, item 11).

A write that times out may still land: nats-py keeps a publish made while the
connection is down and sends it after the reconnect. Every create and memory write
carries a request id turned into a Msg-Id / deterministic id, so the retry an
``Unavailable`` error asks for never makes a duplicate.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import pytest
from mcp.server.mcpserver.exceptions import ToolError

from cflow import events as ev
from cflow.leases import task_id_for_key
from cflow.mcp.adapter import Adapter
from cflow.mcp.server import _Tools, mapped
from cflow.memory import MemoryRecord, build_memory_put, key_token, request_msg_id
from cflow.server import EmbeddedServer, ServerOptions, free_port
from cflow.streams import StoredEvent, names
from cflow.streams.client import publish, wall_ms
from cflow.swarm import Swarm

pytestmark = pytest.mark.integration

SWARM_AGENT = "agent-r"


async def task_events(swarm: Swarm) -> list[str]:
    items = await swarm.log.read(names.events_filter(swarm.name, "task"))
    return [i.event.type for i in items if isinstance(i, StoredEvent)]


async def memory_events(swarm: Swarm) -> list[tuple[str, int]]:
    items = await swarm.log.read(names.events_filter(swarm.name, "memory"))
    return [(i.event.type, getattr(i.event.data, "version", 0)) for i in items
            if isinstance(i, StoredEvent)]


# ------------------------------------------------------- (a) retry after it landed


async def test_task_create_retried_with_its_request_id_creates_nothing_new(
        swarm: Swarm) -> None:
    first = await swarm.tasks.create("build", request_id="req-1")
    again = await swarm.tasks.create("build", request_id="req-1")
    assert again.task_id == first.task_id
    other = await swarm.tasks.create("build", request_id="req-2")
    assert other.task_id != first.task_id
    assert (await task_events(swarm)).count("TaskCreated") == 2


async def test_mcp_task_create_takes_a_request_id(swarm: Swarm) -> None:
    tools = _Tools(Adapter(swarm))
    a = await mapped(tools.task_create)("from the model", request_id="m-1")
    b = await mapped(tools.task_create)("from the model", request_id="m-1")
    c = await mapped(tools.task_create)("from the model")  # a fresh id per call
    assert a.structured_content == b.structured_content
    assert c.structured_content != a.structured_content
    assert len(await swarm.tasks.list()) == 2


async def test_memory_put_retried_with_its_request_id_writes_nothing_new(
        swarm: Swarm) -> None:
    first = await swarm.memory.put("notes", "k", "v1", request_id="w-1")
    again = await swarm.memory.put("notes", "k", "v1", request_id="w-1")
    assert again.version == first.version
    # Even a compare-and-set write: its retry finds its own version, not a conflict.
    cas = await swarm.memory.put("notes", "k", "v2", expected_version=first.version,
                                 request_id="w-2")
    retried = await swarm.memory.put("notes", "k", "v2", expected_version=first.version,
                                     request_id="w-2")
    assert retried.version == cas.version and retried.value == "v2"
    assert [h.version for h in await swarm.memory.history("notes", "k")] == [
        first.version, cas.version]
    tools = _Tools(Adapter(swarm))
    m1 = await mapped(tools.memory_store)("k2", "x", namespace="notes", request_id="m-9")
    m2 = await mapped(tools.memory_store)("k2", "x", namespace="notes", request_id="m-9")
    assert m1.structured_content == m2.structured_content
    assert len(await swarm.memory.history("notes", "k2")) == 1


async def test_memory_retry_completes_a_write_whose_event_was_lost(swarm: Swarm) -> None:
    """The first try stored the value and died before its event: the retry records the
    event (once) and writes no second version."""
    token = key_token("notes", "half")
    record = MemoryRecord(namespace="notes", key="half", value="v", author="agent-r",
                          updated_ms=wall_ms(), request_id="w-3")
    out = build_memory_put(swarm.memory.bucket, token, record, expected_revision=None)
    revision, _ = await publish(swarm.log.js, out)
    assert await memory_events(swarm) == []
    entry = await swarm.memory.put("notes", "half", "v", request_id="w-3")
    assert entry.version == revision
    await swarm.memory.put("notes", "half", "v", request_id="w-3")
    assert await memory_events(swarm) == [("MemoryStored", revision)]


# ------------------------------------------------------------- (b) a real outage


async def test_writes_during_an_outage_are_retried_once_with_the_request_id(
        tmp_path: Path) -> None:
    """NATS goes away under an MCP agent: task_create and memory_store answer
    BACKEND_UNAVAILABLE with a request id; after the restart, the retry with that id
    leaves exactly one task and one memory version, whether or not the first try landed."""
    opts = ServerOptions(port=free_port(), data_dir=tmp_path / "nats", sync="always")
    server = EmbeddedServer(opts)
    await asyncio.to_thread(server.start)
    name = f"t{uuid.uuid4().hex[:12]}"
    try:
        async with Swarm.connect(server.url, swarm=name, agent="agent-r") as swarm:
            tools = _Tools(Adapter(swarm))
            await swarm.tasks.ensure_board()
            await asyncio.to_thread(server.kill)

            loop = asyncio.get_running_loop()
            started = loop.time()
            outcomes = await asyncio.gather(
                mapped(tools.task_create)("written during the outage"),
                mapped(tools.memory_store)("k", "v", namespace="outage"),
                return_exceptions=True)
            assert loop.time() - started < 25
            ids = []
            for outcome in outcomes:
                assert isinstance(outcome, ToolError), outcome
                text = str(outcome)
                assert text.startswith("BACKEND_UNAVAILABLE: ") and "may have been stored" in text
                found = re.search(r'request_id="([^"]+)"', text)
                assert found, text
                ids.append(found.group(1))

            restarted = EmbeddedServer(opts)
            await asyncio.to_thread(restarted.start)
            try:
                task = await mapped(tools.task_create)("written during the outage",
                                                       request_id=ids[0])
                stored = await mapped(tools.memory_store)("k", "v", namespace="outage",
                                                          request_id=ids[1])
                again = await mapped(tools.task_create)("written during the outage",
                                                        request_id=ids[0])
                assert again.structured_content == task.structured_content
                assert task.structured_content is not None
                task_id = task.structured_content["task"]["id"]
                assert (await task_events(swarm)).count("TaskCreated") == 1
                assert (await swarm.tasks.get(task_id)).title == "written during the outage"
                assert stored.structured_content is not None
                history = await swarm.memory.history("outage", "k")
                assert [h.version for h in history] == [stored.structured_content["version"]]
                assert len(await memory_events(swarm)) == 1
            finally:
                await asyncio.to_thread(restarted.stop)
    finally:
        await asyncio.to_thread(server.stop)


def test_a_request_id_becomes_the_puts_msg_id() -> None:
    record = MemoryRecord(namespace="n", key="k", value="v", request_id="r-1")
    out = build_memory_put("b", key_token("n", "k"), record, expected_revision=None)
    assert out.headers["Nats-Msg-Id"] == request_msg_id(key_token("n", "k"), "r-1")
    assert request_msg_id(key_token("n", "k2"), "r-1") != out.headers["Nats-Msg-Id"]
    plain = build_memory_put("b", key_token("n", "k"), MemoryRecord(
        namespace="n", key="k", value="v"), expected_revision=None)
    assert "Nats-Msg-Id" not in plain.headers


async def test_a_put_that_lands_twice_is_stored_once(swarm: Swarm) -> None:
    """What a first try delivered after a reconnect meets at the server: its retry."""
    token = key_token("notes", "twice")
    record = MemoryRecord(namespace="notes", key="twice", value="v", request_id="w-4")
    out = build_memory_put(swarm.memory.bucket, token, record, expected_revision=None)
    first, dup1 = await publish(swarm.log.js, out)
    second, dup2 = await publish(swarm.log.js, out)
    assert (second, dup1, dup2) == (first, False, True)



async def test_a_create_retried_after_its_creator_died_offers_the_task(swarm: Swarm) -> None:
    """The first try was stored and its process died before offering it: the retry
    with the same request id offers the ready task (claim-any needs an offer)."""
    task_id = task_id_for_key(swarm.name, "request\x00req-died")
    await swarm.log.append(ev.TaskCreated(title="build"), task_id, expected=0,
                           msg_id=f"create-{task_id}", actor="died")
    again = await swarm.tasks.create("build", request_id="req-died")
    assert again.task_id == task_id and again.status == "ready"
    taken = await swarm.tasks.claim(agent="w", wait=1.0)
    assert taken is not None and taken.task_id == task_id
    assert (await task_events(swarm)).count("TaskCreated") == 1
