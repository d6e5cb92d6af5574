"""The MCP adapter's tools, in process (SDK client <-> server), against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from mcp import Client

from cflow.mcp.adapter import Adapter
from cflow.mcp.faults import CODES
from cflow.mcp.server import build_server
from cflow.swarm import Swarm

pytestmark = pytest.mark.integration

TOKEN_BUDGET = 2000


@contextlib.asynccontextmanager
async def mcp_client(nats_url: str, swarm_name: str, agent: str,
                     capabilities: tuple[str, ...] = ()) -> AsyncIterator[tuple[Client, Adapter]]:
    """An adapter and an in-process SDK client, hosted in one task of their own.

    The client's anyio cancel scopes must be entered and left by the same task;
    pytest-asyncio may run a fixture's setup and teardown in different ones.
    """
    ready: asyncio.Future[tuple[Client, Adapter]] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def host() -> None:
        async with Swarm.connect(nats_url, swarm=swarm_name, agent=agent) as swarm:
            adapter = Adapter(swarm, capabilities=capabilities)
            async with adapter.running(), Client(build_server(adapter)) as client:
                ready.set_result((client, adapter))
                await stop.wait()

    hosting = asyncio.create_task(host())
    await asyncio.wait({ready, hosting}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        hosting.result()  # re-raise why it did not start
    try:
        yield ready.result()
    finally:
        stop.set()
        await hosting


@pytest.fixture
async def mcp(nats_url: str, swarm_name: str) -> AsyncIterator[tuple[Client, Adapter]]:
    async with mcp_client(nats_url, swarm_name, "mcp-a", ("py",)) as pair:
        yield pair


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    res = await client.call_tool(tool, args)
    assert not res.is_error, res.content[0].text  # type: ignore[union-attr]
    assert isinstance(res.structured_content, dict)
    # The text block carries the same JSON, compact.
    assert json.loads(res.content[0].text) == res.structured_content  # type: ignore[union-attr]
    return res.structured_content


async def refused(client: Client, tool: str, code: str, **args: Any) -> str:
    res = await client.call_tool(tool, args)
    text = res.content[0].text  # type: ignore[union-attr]
    assert res.is_error, text
    assert f"{code}: " in text and "Hint: " in text, text
    assert not any(f"{other}: " in text for other in CODES if other != code)
    return text


# ------------------------------------------------------------------ surface


async def test_tool_list_is_small(mcp: tuple[Client, Adapter]) -> None:
    client, _ = mcp
    listed = await client.list_tools()
    names = {t.name for t in listed.tools}
    assert names == {"task_create", "task_find", "task_claim", "task_update", "task_cancel",
                     "memory_store", "memory_search", "query", "swarm_status", "message",
                     "paths"}
    assert len(listed.tools) <= 12
    wire = json.dumps([t.model_dump(mode="json", by_alias=True, exclude_none=True)
                       for t in listed.tools])
    assert len(wire) / 4 <= TOKEN_BUDGET, len(wire) / 4
    for tool in listed.tools:
        assert tool.description and len(tool.description) < 200
        assert tool.output_schema is None
        assert not list(schema_noise(tool.input_schema)), tool.name


def schema_noise(schema: Any) -> Any:
    """pydantic titles and nullable anyOf wrappers left in a schema."""
    if isinstance(schema, dict):
        if isinstance(schema.get("title"), str):
            yield "title"
        if "anyOf" in schema:
            yield "anyOf"
        for key, value in schema.items():
            if key == "properties":
                for prop in value.values():
                    yield from schema_noise(prop)
            else:
                yield from schema_noise(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from schema_noise(item)


async def test_schema_resource_and_prompt(mcp: tuple[Client, Adapter]) -> None:
    client, adapter = mcp
    resources = await client.list_resources()
    assert [str(r.uri) for r in resources.resources] == ["cflow://schema"]
    text = (await client.read_resource("cflow://schema")).contents[0].text  # type: ignore[union-attr]
    assert "**tasks**(task_id VARCHAR" in text and "**memory**" in text
    prompt = await client.get_prompt("work_next", {})
    body = prompt.messages[0].content.text  # type: ignore[union-attr]
    assert adapter.agent in body and "task_claim" in body and "task_update" in body


# ------------------------------------------------------------------ tasks


async def test_create_claim_note_complete(mcp: tuple[Client, Adapter]) -> None:
    client, adapter = mcp
    dep = (await call(client, "task_create", title="design"))["task"]
    lease = await call(client, "task_claim", task_id=dep["id"])
    await call(client, "task_update", task_id=dep["id"], action="complete",
               epoch=lease["epoch"], text="use a queue")
    created = await call(client, "task_create", title="build", body="do it", priority=5,
                         capabilities=["py"], depends_on=[dep["id"]], labels={"area": "core"},
                         idempotency_key="build-1")
    task = created["task"]
    again = await call(client, "task_create", title="build (retry)", idempotency_key="build-1")
    assert again["task"]["id"] == task["id"] and again["task"]["title"] == "build"

    claimed = await call(client, "task_claim")
    assert claimed["claimed"] and claimed["task"]["id"] == task["id"]
    assert claimed["epoch"] > 0 and claimed["attempt"] == 1
    assert claimed["context"]["dependencies"] == [
        {"id": dep["id"], "title": "design", "result": "use a queue"}]
    assert task["id"] in adapter.leases

    noted = await call(client, "task_update", task_id=task["id"], action="note",
                       text="halfway", paths=["src/a.py"])
    assert noted["noted"]
    # No epoch given: the adapter uses the lease it holds.
    done = await call(client, "task_update", task_id=task["id"], action="complete",
                      text="built")
    assert done == {"task_id": task["id"], "status": "completed"}
    assert task["id"] not in adapter.leases
    shown = await call(client, "task_find", task_id=task["id"])
    assert shown["task"]["result"] == "built" and shown["task"]["status"] == "completed"
    assert shown["notes"] == [{"by": "mcp-a", "text": "halfway", "paths": ["src/a.py"]}]


async def test_claim_nothing_then_wait_is_woken(mcp: tuple[Client, Adapter],
                                                nats_url: str, swarm_name: str) -> None:
    client, _ = mcp
    nothing = await call(client, "task_claim")
    assert nothing["claimed"] is False and nothing["ready"] == 0

    async with Swarm.connect(nats_url, swarm=swarm_name, agent="producer") as other:
        waiting = asyncio.create_task(client.call_tool("task_claim", {"wait_s": 20}))
        created = await other.tasks.create("late work")
        res = await asyncio.wait_for(waiting, 20)
    assert res.structured_content is not None
    assert res.structured_content["task"]["id"] == created.task_id


async def test_claim_is_idempotent(mcp: tuple[Client, Adapter]) -> None:
    client, _ = mcp
    t = (await call(client, "task_create", title="once"))["task"]
    first = await call(client, "task_claim", idempotency_key="c1")
    second = await call(client, "task_claim", idempotency_key="c1")
    assert first == second and first["task"]["id"] == t["id"]
    # Claiming a task we already hold answers the same lease.
    third = await call(client, "task_claim", task_id=t["id"])
    assert third["epoch"] == first["epoch"]



async def test_a_claim_answered_past_its_deadline_is_released_not_held(
        mcp: tuple[Client, Adapter], monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim that comes back after the holder's own deadline (a slow link) may already
    be another agent's: the session is told nothing was claimed, and the task is given
    back at once (the attempt not counted), not kept alive by the adapter."""
    client, adapter = mcp
    t = (await call(client, "task_create", title="answered late"))["task"]  # TTL 30 s
    claim = adapter.swarm.tasks.claim

    async def slow_claim(*args: Any, **kwargs: Any) -> Any:
        lease = await claim(*args, **kwargs)
        if lease is not None:  # as if it came back after its holder's deadline
            lease.clock = msgspec.structs.replace(lease.clock, deadline=time.monotonic())
        return lease

    monkeypatch.setattr(adapter.swarm.tasks, "claim", slow_claim)
    answer = await call(client, "task_claim", task_id=t["id"])
    assert answer["claimed"] is False and "released" in answer["reason"], answer
    assert t["id"] not in adapter.leases
    back = await adapter.swarm.tasks.get(t["id"])
    assert (back.status, back.attempt) == ("ready", 0)

async def test_fail_with_retry_and_release(mcp: tuple[Client, Adapter]) -> None:
    client, adapter = mcp
    t = (await call(client, "task_create", title="flaky", max_attempts=2))["task"]
    lease = await call(client, "task_claim", task_id=t["id"])
    failed = await call(client, "task_update", task_id=t["id"], action="fail",
                        epoch=lease["epoch"], text="boom")
    assert failed["status"] == "ready" and "retried" in failed["retry"]
    u = (await call(client, "task_create", title="give back"))["task"]
    lease = await call(client, "task_claim", task_id=u["id"])
    released = await call(client, "task_update", task_id=u["id"], action="release",
                          text="not my area", idempotency_key="r1")
    assert released["status"] == "ready" and u["id"] not in adapter.leases
    # The retried call with the same key answers the first result instead of LEASE_LOST.
    assert await call(client, "task_update", task_id=u["id"], action="release",
                      epoch=lease["epoch"], idempotency_key="r1") == released


async def test_find_filters_and_pages(mcp: tuple[Client, Adapter]) -> None:
    client, _ = mcp
    for i in range(7):
        await call(client, "task_create", title=f"task {i}", body="needle" if i % 2 else "",
                   capabilities=["py"] if i < 3 else [], labels={"team": "a" if i < 5 else "b"})
    page1 = await call(client, "task_find", limit=3)
    assert [t["title"] for t in page1["tasks"]] == ["task 0", "task 1", "task 2"]
    assert page1["truncated"] and page1["next_cursor"]
    page2 = await call(client, "task_find", limit=3, cursor=page1["next_cursor"])
    assert [t["title"] for t in page2["tasks"]] == ["task 3", "task 4", "task 5"]
    page3 = await call(client, "task_find", limit=3, cursor=page2["next_cursor"])
    assert [t["title"] for t in page3["tasks"]] == ["task 6"] and not page3["truncated"]
    assert "next_cursor" not in page3
    assert len((await call(client, "task_find", capability="py"))["tasks"]) == 3
    assert len((await call(client, "task_find", label="team=b"))["tasks"]) == 2
    assert len((await call(client, "task_find", label="team"))["tasks"]) == 7
    assert len((await call(client, "task_find", text="NEEDLE"))["tasks"]) == 3
    assert (await call(client, "task_find", status="claimed"))["tasks"] == []
    concise = (await call(client, "task_find", limit=1))["tasks"][0]
    assert "body" not in concise
    verbose = (await call(client, "task_find", limit=1, verbose=True))["tasks"][0]
    assert verbose["body"] == "" and verbose["labels"] == {"team": "a"}


async def test_cancel(mcp: tuple[Client, Adapter]) -> None:
    client, adapter = mcp
    t = (await call(client, "task_create", title="doomed"))["task"]
    await call(client, "task_claim", task_id=t["id"])
    out = await call(client, "task_cancel", task_id=t["id"], reason="obsolete",
                     idempotency_key="x1")
    assert out == {"task_id": t["id"], "status": "cancelled"}
    assert t["id"] not in adapter.leases
    assert await call(client, "task_cancel", task_id=t["id"], idempotency_key="x1") == out


async def test_swarm_status(mcp: tuple[Client, Adapter]) -> None:
    client, adapter = mcp
    await call(client, "task_create", title="mine", capabilities=["py"])
    await call(client, "task_create", title="not for me", capabilities=["rust"])
    await adapter.swarm.tasks.create("approve release", kind="gate")
    held = await call(client, "task_claim")
    status = await call(client, "swarm_status")
    assert status["agent"] == "mcp-a" and status["capabilities"] == ["py"]
    assert status["my_leases"] == [{"task_id": held["task"]["id"], "title": "mine",
                                    "epoch": held["epoch"]}]
    assert status["queue"] == {"claimed": 1, "ready": 2}
    assert status["ready_for_me"] == 0
    assert [g["title"] for g in status["gates"]] == ["approve release"]
    assert {"name": "mcp-a", "presence": "working"} in status["agents"]  # holds a lease
    assert "stale" not in status
    assert status["agents_by_presence"]["working"] >= 1


# ------------------------------------------------------------------ memory


async def test_memory_round_trip(mcp: tuple[Client, Adapter]) -> None:
    client, _ = mcp
    stored = await call(client, "memory_store", key="db/choice", value="we use DuckDB for views",
                        namespace="arch", tags=["decision"], idempotency_key="m1")
    assert stored["namespace"] == "arch" and stored["version"] > 0
    again = await call(client, "memory_store", key="db/choice", value="changed",
                       namespace="arch", idempotency_key="m1")
    assert again == stored  # same key: the first answer, nothing rewritten
    got = await call(client, "memory_search", key="db/choice", namespace="arch")
    assert got["entry"]["value"] == "we use DuckDB for views"
    assert got["entry"]["tags"] == ["decision"] and got["entry"]["author"] == "mcp-a"
    hits = await call(client, "memory_search", query="duckdb views")
    assert [h["key"] for h in hits["hits"]] == ["db/choice"]
    assert "[DuckDB]" in hits["hits"][0]["snippet"] or "DuckDB" in hits["hits"][0]["snippet"]


# ------------------------------------------------------------------ query


@pytest.fixture
async def projector(nats_url: str, swarm_name: str, tmp_path: Path) -> AsyncIterator[Any]:
    from cflow.projections.projector import Projector
    from cflow.projections.query import QueryService
    from cflow.streams import EventLog, connect

    nc = await connect(nats_url)
    log = EventLog(nc, swarm_name, actor="projector")
    proj = Projector(log, tmp_path / "p.duckdb")
    service = QueryService(nc, swarm_name, proj, server_id="p1")
    await service.start()
    task = asyncio.create_task(proj.run())
    try:
        # Ready means answering: one query through NATS before the test's first (a
        # "no responders" was seen once in CI right after start).
        from cflow.errors import Unavailable
        from cflow.projections.query import QueryClient

        deadline = time.monotonic() + 10
        while True:
            try:
                await QueryClient(nc, swarm_name).query("SELECT 1", timeout_s=5.0)
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the query service never answered"
                await asyncio.sleep(0.1)  # interest reaching the server sends no event
        yield proj
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await service.stop()
        await proj.close()
        await nc.close()


async def test_query_reads_the_projection(mcp: tuple[Client, Adapter], projector: Any) -> None:
    client, adapter = mcp
    for i in range(5):
        await call(client, "task_create", title=f"q{i}")
    last = await adapter.swarm.log.stream_last_seq()
    assert await projector.wait_for(last, 15)
    out = await call(client, "query", sql="SELECT title FROM tasks ORDER BY title", limit=3)
    assert out["columns"] == ["title"] and out["rows"] == [["q0"], ["q1"], ["q2"]]
    assert out["truncated"] is True
    await refused(client, "query", "QUERY_REJECTED", sql="DELETE FROM tasks")


# ------------------------------------------------------------------ each error code


async def test_error_codes(mcp: tuple[Client, Adapter], nats_url: str, swarm_name: str) -> None:
    client, adapter = mcp
    await refused(client, "task_find", "NOT_FOUND", task_id="no-such-task")
    await refused(client, "memory_search", "NOT_FOUND", key="nope")
    await refused(client, "task_find", "INVALID_ARGUMENT", limit=1000)
    await refused(client, "task_find", "INVALID_ARGUMENT", cursor="x")
    await refused(client, "task_create", "INVALID_ARGUMENT", title="x", depends_on=["ghost"])
    await refused(client, "memory_search", "INVALID_ARGUMENT")
    await refused(client, "task_update", "INVALID_ARGUMENT", task_id="t", action="complete")
    await refused(client, "query", "INVALID_ARGUMENT", sql="SELECT 1", limit=0)

    t = (await call(client, "task_create", title="contested"))["task"]
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="rival") as rival:
        rival_lease = await rival.tasks.claim(t["id"])
        assert rival_lease is not None
        text = await refused(client, "task_claim", "CONFLICT", task_id=t["id"])
        assert "rival" in text
        # An epoch no claim of this task ever had is a mistake, not a lost lease.
        await refused(client, "task_update", "INVALID_ARGUMENT", task_id=t["id"],
                      action="complete", epoch=rival_lease.epoch - 1)
        await rival_lease.complete("theirs")
    await refused(client, "task_cancel", "INVALID_STATE", task_id=t["id"])

    await refused(client, "query", "BACKEND_UNAVAILABLE", sql="SELECT 1")

    root = await adapter.swarm.tasks.create("root")
    await adapter.swarm.control.set_budget(root.task_id, {"max_children": 1})
    await call(client, "task_create", title="child 1", parent_id=root.task_id)
    await refused(client, "task_create", "LIMIT_EXCEEDED", title="child 2",
                  parent_id=root.task_id)


async def test_query_rejected_code_without_projector_is_unavailable(
        mcp: tuple[Client, Adapter], projector: Any) -> None:
    client, _ = mcp
    await refused(client, "query", "QUERY_REJECTED", sql="COPY tasks TO '/tmp/x.csv'")
    await refused(client, "query", "QUERY_REJECTED", sql="SELECT * FROM read_csv('/etc/passwd')")


async def test_lost_lease_is_reported(nats_url: str, swarm_name: str) -> None:
    """A lease the adapter held but lost (cancelled elsewhere) shows in swarm_status."""
    async with mcp_client(nats_url, swarm_name, "mcp-b") as (client, adapter):
        t = (await call(client, "task_create", title="short", lease_ttl_s=1.0))["task"]
        await call(client, "task_claim", task_id=t["id"])
        await adapter.swarm.tasks.cancel(t["id"], "elsewhere")
        lease = adapter.leases[t["id"]]
        await asyncio.wait_for(lease.lost.wait(), 10)
        status = await call(client, "swarm_status")
        assert status["my_leases"][0]["lost"] == "cancelled"
        await refused(client, "task_update", "LEASE_LOST", task_id=t["id"], action="complete")
