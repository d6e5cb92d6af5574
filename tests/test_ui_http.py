"""The web console over HTTP: every endpoint, reads, writes with and without the token, paging.

A real nats-server, a real projector process and a real `cfctl ui` process; the
swarm is seeded through the facade and checked through the event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cflow.swarm import Swarm
from ui_support import Console, cfctl, running_console, start_ui, stop, ui

pytestmark = pytest.mark.integration

OPERATOR = "alice"


@pytest.fixture(scope="module")
def console(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    swarm = f"ui{uuid.uuid4().hex[:10]}"
    with running_console(nats_url, swarm, tmp_path_factory.mktemp("ui"),
                         operator=OPERATOR) as c:
        yield c


@pytest.fixture
async def facade(nats_url: str, console: Console) -> AsyncIterator[Swarm]:
    async with Swarm.connect(nats_url, swarm=console.swarm, agent="seeder") as s:
        yield s


@pytest.fixture
async def http(console: Console) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=console.url, timeout=15.0) as client:
        yield client


async def projected(http: httpx.AsyncClient, facade: Swarm) -> int:
    """Wait (read-your-writes) until the projection has applied everything written so far."""
    seq = await facade.log.stream_last_seq()
    r = await http.get("/api/tasks", params={"seq": seq, "size": 1})
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"] >= seq
    return seq


async def test_board_pages_filters_and_counts(http: httpx.AsyncClient, facade: Swarm) -> None:
    tag = uuid.uuid4().hex[:6]
    made = []
    for i in range(120):
        t = await facade.tasks.create(f"paged {tag} {i:03d}", priority=i % 3,
                                      capabilities=["python"] if i % 2 else ["go"],
                                      labels={"batch": tag, "half": "a" if i < 60 else "b"})
        made.append(t.task_id)
    await projected(http, facade)

    first = (await http.get("/api/tasks", params={"text": tag, "size": 50})).json()
    assert first["total"] == 120 and first["pages"] == 3 and len(first["rows"]) == 50
    assert first["counts"] == {"ready": 120}
    # Priority order, whole ids, every page distinct, the last one partial.
    assert [r["priority"] for r in first["rows"]] == sorted(
        [r["priority"] for r in first["rows"]], reverse=True)
    assert all(len(r["task_id"]) == 36 for r in first["rows"])
    pages = [first["rows"]] + [
        (await http.get("/api/tasks", params={"text": tag, "size": 50, "page": p})).json()["rows"]
        for p in (2, 3)]
    assert [len(p) for p in pages] == [50, 50, 20]
    assert sorted(r["task_id"] for p in pages for r in p) == sorted(made)

    caps = (await http.get("/api/tasks", params={"text": tag, "capability": "go"})).json()
    assert caps["total"] == 60 and all(r["capabilities"] == ["go"] for r in caps["rows"])
    label = (await http.get("/api/tasks", params={"label": f"batch={tag}", "size": 500})).json()
    assert label["total"] == 120
    half = (await http.get("/api/tasks", params={"text": tag, "label": "half=b"})).json()
    assert half["total"] == 60
    one = (await http.get("/api/tasks", params={"text": made[7]})).json()
    assert [r["task_id"] for r in one["rows"]] == [made[7]]
    none = (await http.get("/api/tasks", params={"text": tag, "status": "failed"})).json()
    assert none["total"] == 0 and none["counts"] == {"ready": 120}

    html = await http.get("/board", params={"text": tag, "page": 2})
    assert html.status_code == 200 and "page 2 of 3" in html.text
    assert all(f'data-task="{r["task_id"]}"' in html.text for r in pages[1])
    rows = await http.get("/board/rows", params={"text": tag, "page": 3})
    assert rows.status_code == 200 and rows.text.count("<tr data-task=") == 20


@pytest.mark.parametrize(("params", "error"), [
    ({"status": "nope"}, "unknown status 'nope'"),
    ({"page": "0"}, "page must be between 1"),
    ({"size": "x"}, "size must be a whole number"),
    ({"sort": "random"}, "unknown sort 'random'"),
])
async def test_bad_board_parameters_are_one_line_errors(
        http: httpx.AsyncClient, params: dict[str, str], error: str) -> None:
    r = await http.get("/api/tasks", params=params)
    assert r.status_code == 400
    body = r.json()
    assert body["ok"] is False and body["code"] == "INVALID_ARGUMENT" and error in body["error"]
    page = await http.get("/board", params=params)
    assert page.status_code == 400 and error.replace("'", "&#39;") in page.text
    assert "Traceback" not in page.text


async def test_task_page_has_body_result_notes_and_timeline(
        http: httpx.AsyncClient, facade: Swarm) -> None:
    task = await facade.tasks.create("the task page", body="do **this**",
                                     capabilities=["ui-page"], labels={"branch": "feat/x"})
    lease = await facade.tasks.claim(capabilities=["ui-page"], wait=5)
    assert lease is not None and lease.task_id == task.task_id
    await facade.tasks.note(task.task_id, "half-way there", epoch=lease.epoch)
    await lease.complete("merged in abc123")
    await projected(http, facade)

    data = (await http.get(f"/api/tasks/{task.task_id}")).json()
    assert data["status"] == "completed" and data["result"] == "merged in abc123"
    assert data["body"] == "do **this**" and data["labels"] == {"branch": "feat/x"}
    assert [n["text"] for n in data["notes"]] == ["half-way there"]
    types = [e["type"] for e in data["timeline"]]
    assert types[0] == "TaskCreated" and "TaskClaimed" in types and types[-1] == "TaskCompleted"
    assert "TaskNoted" in types
    for item in data["timeline"]:
        assert item["actor"] == "seeder" and len(item["hlc"]) == 32 and item["server_ms"] > 0
    page = await http.get(f"/tasks/{task.task_id}")
    assert page.status_code == 200
    for text in ("do **this**", "merged in abc123", "half-way there", "TaskCompleted",
                 "feat/x", data["timeline"][0]["hlc"]):
        assert text in page.text
    missing = await http.get("/api/tasks/no-such-task")
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"
    assert (await http.get("/tasks/no-such-task")).status_code == 404


XSS = "<img src=x onerror=alert(1)>"


async def test_hostile_titles_notes_and_actors_are_escaped(
        http: httpx.AsyncClient, facade: Swarm) -> None:
    """A title, a note and an actor written as HTML reach every page as text."""
    parent = await facade.tasks.create(f"parent {XSS}")
    a = await facade.tasks.create(XSS, body=XSS, parent_id=parent.task_id)
    b = await facade.tasks.create(f"b {XSS}", depends_on=[a.task_id],
                                  parent_id=parent.task_id)
    await facade.tasks.note(a.task_id, f"note {XSS}", actor=f"agent{XSS}")
    await facade.tasks.cancel(b.task_id, f"why {XSS}", actor=f"agent{XSS}")
    await projected(http, facade)
    escaped = "&lt;img src=x onerror=alert(1)&gt;"
    pages = {"board": await http.get("/board", params={"text": "onerror"}),
             "task": await http.get(f"/tasks/{a.task_id}"),
             "cancelled": await http.get(f"/tasks/{b.task_id}"),
             "graph": await http.get("/graph", params={"parent": parent.task_id})}
    for name, page in pages.items():
        assert page.status_code == 200, name
        assert "<img" not in page.text and "onerror=alert(1)>" not in page.text, name
    assert escaped in pages["board"].text
    assert f"note {escaped}" in pages["task"].text and f"agent{escaped}" in pages["task"].text
    assert f"why {escaped}" in pages["cancelled"].text
    assert "&lt;img src=x onerror=alert(1" in pages["graph"].text


async def test_relayed_permission_prompts_are_listed_and_answered(
        nats_url: str, http: httpx.AsyncClient, console: Console) -> None:
    """A prompt relayed as a Claude Code session's channel does it is listed; allow and
    deny need the token, reach the session's inbox as the decision, and name the operator."""
    from cflow.mcp.channel import PERMISSION_TOPIC, parse_decision, request_text

    rid = uuid.uuid4().hex[:8]
    async with (Swarm.connect(nats_url, swarm=console.swarm, agent="perm-agent") as session,
                contextlib.AsyncExitStack() as stack):
        # Only prompts of a session that is present can be answered, so only they are listed.
        registered = await session.agents.register("perm-agent", [])
        await stack.enter_async_context(registered.present())
        for n in ("1", "2"):
            await session.messages.send(None, request_text("perm-agent", {
                "request_id": rid + n, "tool_name": "Bash", "description": f"run <b>{n}</b>",
                "input_preview": "{}"}), topic=PERMISSION_TOPIC, importance="high",
                ack_required=True)
        listed = {p["id"]: p for p in (await http.get("/api/permissions")).json()}
        assert {rid + "1", rid + "2"} <= set(listed)
        assert listed[rid + "1"]["agent"] == "perm-agent"
        page = await http.get("/agents")
        assert f'data-permission="{rid}1"' in page.text and "run &lt;b&gt;1" in page.text

        refused = await http.post(f"/api/permissions/{rid}1/allow")
        assert refused.status_code == 401
        r = await http.post(f"/api/permissions/{rid}1/allow", headers=console.auth)
        assert r.status_code == 200 and r.json()["actor"] == f"ui:{OPERATOR}"
        r = await http.post(f"/api/permissions/{rid}2/deny", headers=console.auth)
        assert r.status_code == 200 and r.json()["behavior"] == "deny"
        again = await http.post(f"/api/permissions/{rid}2/deny", headers=console.auth)
        assert again.status_code == 404 and again.json()["code"] == "NOT_FOUND"
        assert (await http.post(f"/api/permissions/{rid}1/maybe",
                                headers=console.auth)).status_code == 404
        left = {p["id"] for p in (await http.get("/api/permissions")).json()}
        assert not {rid + "1", rid + "2"} & left
        sent = [i.event for i in await session.log.read()
                if getattr(i, "event", None) is not None and i.event.type == "MessageSent"
                and i.event.data.to == "perm-agent"]
        decisions = {parse_decision(e.data.text): e.actor for e in sent}
        assert decisions == {("allow", rid + "1"): f"ui:{OPERATOR}",
                             ("deny", rid + "2"): f"ui:{OPERATOR}"}


async def test_analytics_shows_merge_lead_time_and_rejections(
        http: httpx.AsyncClient, facade: Swarm) -> None:
    """From the merge events, through the gitflow report's SQL; "no merges yet" before."""
    from cflow import events as ev

    await projected(http, facade)
    assert (await http.get("/api/analytics")).json()["merges"] is None
    assert "no merges yet" in (await http.get("/analytics")).text
    ok, bad = (await facade.tasks.create("merge ok"), await facade.tasks.create("merge bad"))
    for t in (ok, bad):
        await facade.log.append(ev.MergeRequested(task_id=t.task_id, epoch=1, branch="b",
                                                  head="h1"), t.task_id)
    await facade.log.append(ev.Merged(task_id=ok.task_id, head="h1", target="main",
                                      previous="p", commit="c", merger="m"), ok.task_id)
    await facade.log.append(ev.MergeRejected(task_id=bad.task_id, head="h1", target="main",
                                             cause="conflict"), bad.task_id)
    await projected(http, facade)
    m = (await http.get("/api/analytics")).json()["merges"]
    assert (m["requests"], m["merged"], m["rejected"]) == (2, 1, 1)
    assert m["rejection_rate"] == 0.5 and m["causes"] == "conflict=1"
    assert m["lead_time_median_s"] is not None and m["lead_time_median_s"] >= 0
    page = (await http.get("/analytics")).text
    assert "no merges yet" not in page and "50.0%" in page and "conflict=1" in page


async def test_every_read_page_and_api_answers(http: httpx.AsyncClient, facade: Swarm) -> None:
    await facade.memory.put("conventions", "api-style", "snake_case everywhere", tags=["style"])
    await facade.messages.send("worker-7", "parser is in, rebase please")
    a = await facade.tasks.create("graph a")
    await facade.tasks.create("graph b", depends_on=[a.task_id])
    await projected(http, facade)

    for path in ("/board", "/graph", "/agents", "/analytics", "/memory", "/messages",
                 "/banner", "/healthz", "/static/app.js", "/static/app.css",
                 "/static/vendor/htmx-2.0.11/htmx.min.js", "/static/vendor/htmx-2.0.11/LICENSE"):
        r = await http.get(path)
        assert r.status_code == 200, (path, r.text[:200])
    assert (await http.get("/")).status_code == 303
    assert (await http.get("/favicon.ico")).status_code == 204
    # The fragments the live pages re-read.
    for path, marker in ((f"/tasks/{a.task_id}/body", 'id="task"'),
                         ("/graph/body", 'id="graph"'), ("/agents?part=1", 'id="agents"'),
                         ("/analytics?part=1", 'id="analytics"'),
                         ("/board/rows", 'id="board"')):
        r = await http.get(path)
        assert r.status_code == 200 and marker in r.text and "<html" not in r.text, path
    page = await http.get("/board")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    rebound = await http.get("/api/tasks", headers={"Host": "evil.example:8700"})
    assert rebound.status_code == 421 and "loopback" in rebound.text
    out = await http.post("/logout")
    assert out.status_code == 303 and 'cflow_ui=""' in out.headers["set-cookie"]

    graph = (await http.get("/api/graph")).json()
    ids = {n["task_id"] for n in graph["nodes"]}
    assert a.task_id in ids and any(e[1] == a.task_id for e in graph["edges"])
    assert set(graph["positions"]) == ids and graph["critical"]
    assert graph["unlinked"] >= 1  # tasks of other tests, without dependencies
    assert all(any(n["task_id"] in e for e in graph["edges"]) for n in graph["nodes"])
    assert isinstance((await http.get("/api/agents")).json(), list)
    analytics = (await http.get("/api/analytics")).json()
    assert analytics["attempts"]["tasks"] >= 2 and "latency" in analytics
    assert sum(m["created"] for m in analytics["per_minute"]) >= 2
    assert 'id="per-minute"' in (await http.get("/analytics")).text
    memory = (await http.get("/api/memory", params={"q": "snake case"})).json()
    assert [h["key"] for h in memory["hits"]] == ["api-style"]
    assert any(r["key"] == "api-style" for r in memory["rows"])
    page = await http.get("/memory", params={"q": "snake case"})
    assert "api-style" in page.text
    msgs = (await http.get("/api/messages", params={"agent": "worker-7"})).json()
    assert [m["text"] for m in msgs["rows"]] == ["parser is in, rebase please"]
    assert {"agent": "worker-7", "messages": 1, "unacked": 1} in msgs["inboxes"]
    control = (await http.get("/api/control")).json()
    assert control["mode"] == "running" and "pending_gates" in control


async def _actor_of_last(facade: Swarm, etype: str) -> str:
    from cflow.streams.client import StoredEvent

    items = await facade.log.read()
    return [i for i in items if isinstance(i, StoredEvent) and i.event.type == etype][-1
                                                                                       ].event.actor


async def test_writes_need_the_token_and_name_the_operator(
        http: httpx.AsyncClient, console: Console, facade: Swarm) -> None:
    before = await facade.log.stream_last_seq()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = await http.post("/api/swarm/pause", data={"reason": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"
    # The login cookie alone is not enough for a write: it must come from the page (htmx).
    cookie = await session_cookie(console)
    r = await http.post("/api/swarm/pause", headers=cookie)
    assert r.status_code == 401
    # The raw token as a cookie is no session (the cookie holds a random id).
    r = await http.post("/api/swarm/pause", headers={"Cookie": f"cflow_ui={console.token}",
                                                     "HX-Request": "true"})
    assert r.status_code == 401
    assert await facade.log.stream_last_seq() == before  # nothing was written
    assert (await facade.control.state())["mode"] == "running"

    r = await http.post("/api/swarm/pause", data={"reason": "deploy freeze"},
                        headers=console.auth)
    assert r.status_code == 200, r.text
    assert r.json()["actor"] == f"ui:{OPERATOR}" and r.json()["mode"] == "paused"
    assert await _actor_of_last(facade, "SwarmPaused") == f"ui:{OPERATOR}"
    banner = await http.get("/banner")
    assert "PAUSED" in banner.text and f"ui:{OPERATOR}" in banner.text
    assert "deploy freeze" in banner.text

    # From the page: cookie + HX-Request gives an HTML fragment naming who did it.
    r = await http.post("/api/swarm/resume", headers={**cookie, "HX-Request": "true"})
    assert r.status_code == 200 and f"swarm resumed by ui:{OPERATOR}" in r.text
    assert await _actor_of_last(facade, "SwarmResumed") == f"ui:{OPERATOR}"
    assert (await facade.control.state())["mode"] == "running"

    r = await http.post("/api/swarm/stop", json={"reason": "end of day"}, headers=console.auth)
    assert r.status_code == 200 and r.json()["mode"] == "stopped"
    assert await _actor_of_last(facade, "SwarmStopped") == f"ui:{OPERATOR}"
    r = await http.post("/api/swarm/resume", headers=console.auth)
    assert r.status_code == 200 and r.json()["mode"] == "running"


async def test_no_write_endpoint_acts_without_the_token(
        http: httpx.AsyncClient, console: Console, facade: Swarm) -> None:
    gate = await facade.tasks.create("untouched gate", kind="gate")
    task = await facade.tasks.create("untouched task")
    done = await facade.tasks.create("untouched cancelled task")
    await facade.tasks.cancel(done.task_id)
    cookie = await session_cookie(console)
    before = await facade.log.stream_last_seq()
    paths = ["/api/swarm/pause", "/api/swarm/resume", "/api/swarm/stop",
             f"/api/gates/{gate.task_id}/approve", f"/api/gates/{gate.task_id}/reject",
             f"/api/tasks/{task.task_id}/cancel", f"/api/tasks/{done.task_id}/requeue"]
    for path in paths:
        for headers in ({}, {"Authorization": "Bearer nope"},
                        cookie,  # the session cookie without HX-Request
                        {"Cookie": f"cflow_ui={console.token}", "HX-Request": "true"},
                        {"Cookie": "cflow_ui_session=nope", "HX-Request": "true"}):
            r = await http.post(path, headers=headers, data={"now": "1"})
            assert r.status_code == 401, (path, headers, r.text)
        assert (await http.get(path)).status_code == 405  # reads never act
    assert await facade.log.stream_last_seq() == before
    assert (await facade.tasks.get(gate.task_id)).status == "ready"
    assert (await facade.tasks.get(task.task_id)).status == "ready"


async def session_cookie(console: Console) -> dict[str, str]:
    """Log in with the token, as the /login#token=... page posts it; the Cookie header."""
    async with httpx.AsyncClient(base_url=console.url, timeout=15.0) as client:
        r = await client.post("/login", data={"token": console.token})
        assert r.status_code == 303, r.text
        return {"Cookie": f"cflow_ui_session={client.cookies['cflow_ui_session']}"}


async def test_login_sets_the_cookie_and_refuses_a_wrong_token(
        http: httpx.AsyncClient, console: Console) -> None:
    assert console.login.endswith(f"/login#token={console.token}")  # never sent in a URL
    in_url = await http.get("/login", params={"token": console.token})
    assert in_url.status_code == 400 and "set-cookie" not in in_url.headers
    bad = await http.post("/login", data={"token": "nope"})
    assert bad.status_code == 401 and "cflow_ui" not in bad.headers.get("set-cookie", "")
    good = await http.post("/login", data={"token": console.token, "next": "//evil.example"})
    assert good.status_code == 303 and good.headers["location"] == "/board"
    set_cookie = good.headers["set-cookie"]
    assert "cflow_ui_session=" in set_cookie and "HttpOnly" in set_cookie
    assert "Max-Age=28800" in set_cookie and console.token not in set_cookie
    sid = http.cookies["cflow_ui_session"]
    http.cookies.clear()
    page = await http.get("/board", headers={"Cookie": f"cflow_ui_session={sid}"})
    assert f"acting as <b>ui:{OPERATOR}</b>" in page.text
    http.cookies.clear()  # the jar kept the login's cookie
    assert "read-only" in (await http.get("/board")).text


async def test_gates_cancel_and_requeue(http: httpx.AsyncClient, console: Console,
                                        facade: Swarm) -> None:
    gate = await facade.tasks.create("release approval", kind="gate")
    after = await facade.tasks.create("ship", depends_on=[gate.task_id])
    gate2 = await facade.tasks.create("risky migration", kind="gate")
    after2 = await facade.tasks.create("migrate", depends_on=[gate2.task_id])

    r = await http.post(f"/api/gates/{gate.task_id}/approve", data={"note": "ok"})
    assert r.status_code == 401
    r = await http.post(f"/api/gates/{gate.task_id}/approve", data={"note": "reviewed"},
                        headers=console.auth)
    assert r.status_code == 200 and r.json()["task"]["status"] == "completed"
    assert (await facade.tasks.get(after.task_id)).status == "ready"
    again = await http.post(f"/api/gates/{gate.task_id}/reject", headers=console.auth)
    assert again.status_code == 409 and f"approved by ui:{OPERATOR}" in again.json()["error"]
    r = await http.post(f"/api/gates/{gate2.task_id}/reject", data={"note": "too risky"},
                        headers=console.auth)
    assert r.status_code == 200 and r.json()["task"]["status"] == "failed"
    assert (await facade.tasks.get(after2.task_id)).status == "blocked"
    assert (await http.post(f"/api/gates/{gate2.task_id}/frobnicate",
                            headers=console.auth)).status_code == 404

    victim = await facade.tasks.create("to cancel")
    r = await http.post(f"/api/tasks/{victim.task_id}/cancel", headers=console.auth)
    assert r.status_code == 200 and r.json()["task"]["status"] == "cancelled"
    history = await facade.tasks.history(victim.task_id)
    assert history[-1].event.type == "TaskCancelled"
    assert history[-1].event.actor == f"ui:{OPERATOR}"
    r = await http.post(f"/api/tasks/{victim.task_id}/cancel", headers=console.auth)
    assert r.status_code == 409 and "already cancelled" in r.json()["error"]

    live = await http.post(f"/api/tasks/{after.task_id}/requeue", headers=console.auth)
    assert live.status_code == 409 and "only failed, cancelled or blocked" in live.json()["error"]
    r = await http.post(f"/api/tasks/{victim.task_id}/requeue", headers=console.auth)
    assert r.status_code == 200, r.text
    copy = r.json()["task"]
    assert copy["status"] == "ready" and copy["title"] == "to cancel"
    assert copy["labels"]["requeued_from"] == victim.task_id
    assert copy["created_by"] == f"ui:{OPERATOR}"
    missing = await http.post("/api/tasks/nope/cancel", headers=console.auth)
    assert missing.status_code == 404


async def test_live_events_stream_reports_a_new_task(http: httpx.AsyncClient,
                                                     facade: Swarm) -> None:
    async with http.stream("GET", "/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        assert (await anext(lines)) == "event: hello"
        hello = json.loads((await anext(lines)).removeprefix("data: "))
        task = await facade.tasks.create("seen live")
        seq = await facade.log.last_seq("task", task.task_id)
        assert seq > hello["seq"]

        async def update() -> dict[str, Any]:
            async for line in lines:
                if line.startswith("data: "):
                    body = json.loads(line.removeprefix("data: "))
                    if body["seq"] >= seq:
                        return dict(body)
            raise AssertionError("stream ended")

        body = await asyncio.wait_for(update(), 5.0)
    assert "TaskCreated" in body["types"]
    rows = await http.get("/board/rows", params={"seq": body["seq"], "text": task.task_id})
    assert f'data-task="{task.task_id}"' in rows.text


def test_non_loopback_needs_auth_and_tls(console: Console) -> None:
    done = subprocess.run(cfctl("ui", "--listen", "0.0.0.0", "--port", "0"),
                          env=console.env, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: refusing to serve the console on 0.0.0.0 without "
                                   "auth: pass --auth (every page then needs the token) or "
                                   "listen on 127.0.0.1")
    plain = subprocess.run(cfctl("ui", "--listen", "0.0.0.0", "--port", "0", "--auth"),
                           env=console.env, capture_output=True, text=True, timeout=30,
                           check=False)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1
    assert "over plain HTTP" in plain.stderr and "--behind-tls-proxy" in plain.stderr


def test_cfctl_up_serves_the_console_with_ui_port(tmp_path: Path) -> None:
    import os
    import re

    from cflow.server import free_port
    from ui_support import first_line

    port = free_port()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "CFLOW_UI_TOKEN": "up-token",
           "CFLOW_SWARM": "upui"}
    proc = subprocess.Popen(cfctl("up", "--port", str(port), "--data-dir", str(tmp_path / "d"),
                                  "--sync", "default", "--ui-port", "0"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = first_line(proc, "stderr", 60.0, "console at")
        found = re.search(r"console at (http://127\.0\.0\.1:\d+)", line)
        assert found is not None and "login#token=up-token" in line
        base = found.group(1)
        with httpx.Client(base_url=base, timeout=15.0) as client:
            assert client.get("/healthz").json()["swarm"] == "upui"
            # The projector starts beside the console and announces nothing: until it
            # answers, pages are a one-line 503 that reloads itself.
            deadline = time.monotonic() + 30
            while (board := client.get("/board")).status_code == 503:
                assert "no projector answers" in board.text and 'http-equiv="refresh"' in board.text
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert board.status_code == 200
            r = client.post("/api/swarm/pause", headers={"Authorization": "Bearer up-token"})
            assert r.status_code == 200 and r.json()["actor"].startswith("ui:")
    finally:
        stop(proc)
    assert proc.returncode == 130  # stopped by a signal (documented exit code)
    detached = subprocess.run(cfctl("up", "--detach", "--ui-port", "0", "--port", "1"), env=env,
                              capture_output=True, text=True, timeout=30, check=False)
    assert detached.returncode == 2 and "--ui-port serves the console" in detached.stderr


async def test_agents_page_shows_presence_held_tasks_and_utilisation(
        nats_url: str, http: httpx.AsyncClient, console: Console, facade: Swarm) -> None:
    await facade.agents.register("ui-ghost", ["go"])  # said hello, no presence key, no lease
    async with Swarm.connect(nats_url, swarm=console.swarm, agent="ui-worker") as worker:
        agent = await worker.agents.register("ui-worker", ["ui-agents"])
        asking = await worker.agents.register("ui-asking", [])
        ci = await worker.agents.register("ui-ci", [])
        async with agent.present(), asking.present(), ci.present():
            # As the Claude Code hooks record a permission prompt (cflow.hooks.WAITING).
            await worker.agents.set_status("ui-asking", "busy",
                                           reason="waiting on a human: Bash(rm -rf build)")
            await worker.agents.set_status("ui-ci", "online", reason="waiting for CI",
                                           force=True)
            task = await facade.tasks.create("held by ui-worker", capabilities=["ui-agents"],
                                             priority=1000)  # before the others ready here
            lease = await worker.tasks.claim(capabilities=["ui-agents"], wait=5)
            assert lease is not None and lease.task_id == task.task_id
            await projected(http, facade)
            agents = {a["agent_id"]: a for a in (await http.get("/api/agents")).json()}
            assert agents["ui-worker"]["status"] == "working"
            assert agents["ui-worker"]["held"] == [task.task_id]
            assert agents["ui-worker"]["capabilities"] == ["ui-agents"]
            assert agents["ui-ghost"]["status"] == "offline"  # `cfctl agents` says so too
            assert agents["ui-asking"]["status"] == "waiting_on_human"
            assert agents["ui-ci"]["status"] == "idle"  # it waits, but not on a human
            page = await http.get("/agents")
            assert ">waiting on a human<" in page.text
            assert 'data-agent="ui-worker"' in page.text and task.task_id in page.text
            await lease.complete("ok")
    await projected(http, facade)
    agents = {a["agent_id"]: a for a in (await http.get("/api/agents")).json()}
    assert agents["ui-worker"]["status"] == "offline" and agents["ui-worker"]["held"] == []
    assert agents["ui-worker"]["attempts"] == 1 and agents["ui-worker"]["busy_s"] > 0


# ------------------------------------------------- a second console: --auth, behind a proxy
# One process for three tests (in this order): every page needs the token; its NATS
# connection dropped and restored; then it is killed with kill -9 mid-request.


@pytest.fixture(scope="module")
def second(nats_url: str, console: Console) -> Iterator[tuple[Any, Any, dict[str, str]]]:
    from faults import Proxy

    with Proxy(nats_url, name="ui-nats") as proxy, \
            ui({**console.env, "CFLOW_URL": proxy.url}, "--auth", "--operator", "erin") as (
                proc, info):
        yield proxy, proc, info


async def test_with_auth_every_page_needs_the_token(second: Any) -> None:
    _, _, info = second
    async with httpx.AsyncClient(base_url=info["url"], timeout=10.0) as client:
        assert (await client.get("/board")).status_code == 401
        assert (await client.get("/api/tasks")).status_code == 401
        assert (await client.get("/events")).status_code == 401
        assert (await client.get("/healthz")).status_code == 200
        ok = await client.get("/api/tasks", headers={
            "Authorization": f"Bearer {info['token']}"})
        assert ok.status_code == 200
        login = await client.post("/login", data={"token": info["token"]})
        assert login.status_code == 303
        assert (await client.get("/board")).status_code == 200  # the cookie now


async def test_live_updates_survive_a_dropped_nats_connection(
        second: Any, facade: Swarm) -> None:
    """The console's NATS connection goes down with events written meanwhile: once it is
    back, the page is told about them (nothing skipped) and actions work again."""
    proxy, _, info = second
    bearer = {"Authorization": f"Bearer {info['token']}"}
    await proxy.wait_connections(1)
    async with httpx.AsyncClient(base_url=info["url"], timeout=15.0, headers=bearer) as http, \
            http.stream("GET", "/events") as stream:
        lines = stream.aiter_lines()
        assert (await anext(lines)) == "event: hello"
        await anext(lines)
        proxy.down()
        during = await facade.tasks.create("written while the console was cut off")
        seq = await facade.log.last_seq("task", during.task_id)
        proxy.heal()

        async def update() -> dict[str, Any]:
            async for line in lines:
                if line.startswith("data: "):
                    body = json.loads(line.removeprefix("data: "))
                    if body["seq"] >= seq:
                        return dict(body)
            raise AssertionError("stream ended")

        # The console reconnects (0.25 s apart) and its follower places a new ordered
        # consumer after the last event it saw: well under a second, 10 s under load.
        body = await asyncio.wait_for(update(), 10.0)
        assert "TaskCreated" in body["types"]
        rows = await http.get("/board/rows", params={"seq": body["seq"],
                                                     "text": during.task_id})
        assert f'data-task="{during.task_id}"' in rows.text
        r = await http.post(f"/api/tasks/{during.task_id}/cancel")
        assert r.status_code == 200 and r.json()["actor"] == "ui:erin"
    assert (await facade.tasks.get(during.task_id)).status == "cancelled"


async def test_requeue_survives_a_console_killed_mid_request(
        nats_url: str, console: Console, facade: Swarm) -> None:
    """kill -9 of the console after its requeue reached NATS but before the answer came
    back (the proxy delays every byte); the operator retries on a restarted console:
    exactly one copy exists in the event log (its idempotency key names the task)."""
    from cflow.streams import names
    from faults import Proxy

    victim = await facade.tasks.create("requeue under fire")
    await facade.tasks.cancel(victim.task_id, "test")
    created: asyncio.Queue[str] = asyncio.Queue()

    async def seen(msg: Any) -> None:
        if b"requeued_from" in msg.data and victim.task_id.encode() in msg.data:
            created.put_nowait(msg.subject)

    sub = await facade.nc.subscribe(names.events_filter(console.swarm, "task"), cb=seen)
    env = {**console.env}
    try:
        with Proxy(nats_url, name="ui-requeue") as proxy, \
                ui({**env, "CFLOW_URL": proxy.url}, "--operator", "erin") as (proc, info):
            proxy.delay(500)  # each way: every NATS reply of this console comes 1 s later
            async with httpx.AsyncClient(base_url=info["url"], timeout=30.0) as other:
                pending = asyncio.create_task(other.post(
                    f"/api/tasks/{victim.task_id}/requeue", headers={
                        "Authorization": f"Bearer {info['token']}"}))
                # The TaskCreated is stored; its ack is still half a second away.
                await asyncio.wait_for(created.get(), 20.0)
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                with pytest.raises(httpx.TransportError):
                    await pending  # the console died before it answered
        with ui(env, "--operator", "erin") as (_, info):  # the restarted console
            async with httpx.AsyncClient(base_url=info["url"], timeout=15.0) as http:
                for _ in range(2):  # the retried click, twice
                    r = await http.post(f"/api/tasks/{victim.task_id}/requeue",
                                        headers={"Authorization": f"Bearer {info['token']}"})
                    assert r.status_code == 200, r.text
    finally:
        await sub.unsubscribe()
    copies = [i for i in await facade.log.read(names.events_filter(console.swarm, "task"))
              if getattr(i, "event", None) is not None and i.event.type == "TaskCreated"
              and i.event.data.labels.get("requeued_from") == victim.task_id]
    assert len(copies) == 1
    assert copies[0].event.actor == "ui:erin"


async def test_log_in_with_a_nats_user_and_act_as_it(
        http: httpx.AsyncClient, console: Console, tmp_path: Path) -> None:
    """Instead of the token: a NATS user of the swarm, checked by a server that requires
    users; its actions are recorded as nats:<user>."""
    from cflow import creds
    from cflow.server import EmbeddedServer, ServerOptions, free_port

    # A server without users cannot vouch for anyone.
    r = await http.post("/login", data={"user": f"{console.swarm}.w1", "password": "x"})
    assert r.status_code == 401 and "lets anyone in" in r.text

    auth = tmp_path / "auth"
    admin = creds.create(auth, "admin", "authui", admin=True)
    agent = creds.create(auth, "w1", "authui")
    other = creds.create(auth, "w1", "elsewhere")
    server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=tmp_path / "data",
                                          sync="default",
                                          auth_include=str(auth / creds.AUTH_CONF)))
    server.start()
    try:
        url = creds.client_url(admin, server.url)
        async with Swarm.connect(url, swarm="authui", agent="seeder") as s:  # makes streams
            env = {**console.env, "CFLOW_URL": url, "CFLOW_SWARM": "authui"}
            with ui(env, "--operator", "tok") as (_, info):
                async with httpx.AsyncClient(base_url=info["url"], timeout=15.0) as client:
                    for user, password, why in ((agent.name, "wrong", "NATS refused user"),
                                                (other.name, other.password, "not a user of"),
                                                ("", "", "NATS user and its password")):
                        r = await client.post("/login", data={"user": user, "password": password})
                        assert r.status_code == 401 and why in r.text, (user, r.text)
                        assert "cflow_ui_session" not in r.headers.get("set-cookie", "")
                    r = await client.post("/login", data={"user": agent.name,
                                                          "password": agent.password})
                    assert r.status_code == 303 and "cflow_ui_session=" in r.headers["set-cookie"]
                    page = await client.get("/banner")
                    assert page.status_code == 200
                    refused = await client.post("/api/swarm/pause")  # the session, no HX-Request
                    assert refused.status_code == 401
                    r = await client.post("/api/swarm/pause", data={"reason": "by a NATS user"},
                                          headers={"HX-Request": "true"})
                    assert r.status_code == 200 and f"paused by nats:{agent.name}" in r.text
                    history = await s.log.read()
                    paused = [i for i in history if getattr(i, "event", None) is not None
                              and i.event.type == "SwarmPaused"]
                    assert paused[-1].event.actor == f"nats:{agent.name}"
                    gone = await s.tasks.create("requeued by a NATS user")
                    await s.tasks.cancel(gone.task_id, "test")
                    r = await client.post(f"/api/tasks/{gone.task_id}/requeue",
                                          headers={"HX-Request": "true"})
                    assert r.status_code == 200, r.text
                    created = [i.event for i in await s.log.read()
                               if getattr(i, "event", None) is not None
                               and i.event.type == "TaskCreated"
                               and i.event.data.labels.get("requeued_from") == gone.task_id]
                    assert [e.actor for e in created] == [f"nats:{agent.name}"]
                    sid = client.cookies["cflow_ui_session"]
                    assert (await client.post("/logout")).status_code == 303
                    client.cookies.clear()
                    r = await client.post("/api/swarm/resume", headers={  # the old session is gone
                        "HX-Request": "true", "Cookie": f"cflow_ui_session={sid}"})
                    assert r.status_code == 401
    finally:
        server.stop()


async def test_nats_down_is_a_one_line_503_without_a_traceback(
        nats_url: str, console: Console) -> None:
    """Whatever a read raises with NATS gone (raw client errors included), the page is a
    one-line 503 and the console's stderr holds no traceback."""
    from faults import Proxy

    with Proxy(nats_url, name="ui-down") as proxy:
        proc, info = start_ui({**console.env, "CFLOW_URL": proxy.url}, "--operator", "dan")
        try:
            async with httpx.AsyncClient(base_url=info["url"], timeout=30.0) as client:
                proxy.down()
                for path in ("/board", "/api/tasks", "/agents", "/memory?q=x", "/tasks/x"):
                    r = await client.get(path)
                    assert r.status_code == 503, (path, r.status_code, r.text[:300])
                    if path.startswith("/api/"):
                        assert r.json()["ok"] is False and "\n" not in r.json()["error"]
                    else:
                        assert '<p class="flash-msg err">' in r.text
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            finally:
                stderr = proc.stderr.read() if proc.stderr is not None else ""
                stop(proc)
    assert "Traceback" not in stderr, stderr


async def test_live_hub_start_with_nats_silent_is_unavailable(
        nats_url: str, console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    """NATS accepts bytes but never answers while the console starts: one Unavailable,
    not a bare TimeoutError."""
    from cflow.errors import Unavailable
    from cflow.ui import live
    from faults import Proxy

    monkeypatch.setattr(live, "START_TIMEOUT_S", 1.0)
    with Proxy(nats_url, name="ui-silent") as proxy:
        async with Swarm.connect(proxy.url, swarm=console.swarm, agent="ui-hub",
                                 ensure=False) as s:
            proxy.blackhole()
            hub = live.LiveHub(s)
            with pytest.raises(Unavailable, match="could not follow the swarm's events"):
                await hub.start()
            assert hub._task is None
            proxy.heal()


async def test_console_serves_https_with_a_certificate(
        console: Console, tmp_path: Path) -> None:
    """--tls-cert/--tls-key: HTTPS, and the login cookie is Secure."""
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    with ui(console.env, "--tls-cert", str(cert), "--tls-key", str(key)) as (_, info):
        assert info["url"].startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        async with httpx.AsyncClient(base_url=info["url"], verify=context,
                                     timeout=15.0) as client:
            assert (await client.get("/healthz")).status_code == 200
            login = await client.post("/login", data={"token": info["token"]})
            assert login.status_code == 303
            assert "secure" in login.headers["set-cookie"].lower()
