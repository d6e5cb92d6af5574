"""The console's pure parts: DAG layout, board filters, access rules."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cflow.errors import InvalidInput
from cflow.ui.auth import Access, listener_problem, operator_problem
from cflow.ui.graph import NODE_H, NODE_W, layers, layout
from cflow.ui.reads import BoardFilter


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[str], list[tuple[str, str]]]:
    n = draw(st.integers(1, 40))
    ids = [f"t{i}" for i in range(n)]
    deps = []
    for i in range(1, n):
        for j in draw(st.sets(st.integers(0, i - 1), max_size=3)):
            deps.append((ids[i], ids[j]))  # only on earlier tasks: acyclic
    return ids, deps


@settings(max_examples=60, deadline=None)
@given(dags())
def test_layout_places_dependencies_left_and_never_overlaps(
        dag: tuple[list[str], list[tuple[str, str]]]) -> None:
    ids, deps = dag
    lay = layout([(i, i, "ready") for i in ids], deps)
    at = {n.id: n for n in lay.nodes}
    assert set(at) == set(ids)
    for task, dep in deps:
        assert at[dep].layer < at[task].layer and at[dep].x + NODE_W < at[task].x
    for a, b in itertools.combinations(lay.nodes, 2):
        assert abs(a.x - b.x) >= NODE_W or abs(a.y - b.y) >= NODE_H
    assert all(0 <= n.x + NODE_W <= lay.width and 0 <= n.y + NODE_H <= lay.height
               for n in lay.nodes)
    assert len(lay.edges) == len(deps)


def test_layers_are_longest_paths_and_the_critical_path_is_marked() -> None:
    deps = [("b", "a"), ("c", "b"), ("c", "a"), ("d", "a")]
    assert layers(["a", "b", "c", "d"], deps) == {"a": 0, "b": 1, "c": 2, "d": 1}
    lay = layout([(i, i.upper(), "pending") for i in "abcd"], deps, critical=["a", "b", "c"])
    assert {n.id for n in lay.nodes if n.critical} == {"a", "b", "c"}
    assert {(e.src, e.dst) for e in lay.edges if e.critical} == {("a", "b"), ("b", "c")}
    assert layers(["x", "y"], [("x", "y"), ("y", "x")]) == {"x": 0, "y": 0}  # a cycle


def test_board_filter_keeps_browser_values_out_of_the_sql() -> None:
    evil = "x'; DROP TABLE tasks; --"
    f = BoardFilter.parse({"text": evil, "capability": evil, "label": f"k={evil}",
                           "agent": evil, "status": "ready", "sort": "age", "page": "3"})
    where, args = f.where()
    assert evil not in where and "DROP" not in where
    assert args.count(evil) == 3 and f"%{evil}%" in args
    assert f.page == 3 and "page=3" in f.query_string() and "sort=age" in f.query_string()
    assert "page" not in BoardFilter().query_string()
    with pytest.raises(InvalidInput, match="unknown status"):
        BoardFilter.parse({"status": "done"})
    with pytest.raises(InvalidInput, match="size must be between 1 and 500"):
        BoardFilter.parse({"size": "100000"})


def test_access_rules() -> None:
    access = Access(token="s3cret", operator="dana")
    assert access.actor == "ui:dana"
    assert access.may_read({}, {})
    assert access.write_refusal({"authorization": "Bearer s3cret"}, {}) is None
    assert access.write_refusal({"authorization": "Bearer nope"}, {}) is not None
    # The cookie holds a session id, never the token itself.
    assert access.write_refusal({"hx-request": "true"}, {"cflow_ui": "s3cret"}) is not None
    mine = {"cflow_ui_session": access.open_session()}
    assert access.write_refusal({}, mine) is not None  # no HX-Request
    assert access.write_refusal({"hx-request": "true"}, mine) is None
    assert access.identity({}, mine) == "ui:dana"
    sid = access.open_session("alpha.w1")
    session = {"cflow_ui_session": sid}
    assert access.identity({}, session) == "nats:alpha.w1"
    assert access.identity({"authorization": "Bearer s3cret"}, {}) == "ui:dana"
    assert access.write_refusal({"hx-request": "true"}, session) is None
    assert access.write_refusal({}, session) is not None  # no HX-Request
    assert access.write_refusal({"hx-request": "true"}, {"cflow_ui_session": "forged"})
    locked = Access(token="s3cret", operator="dana", reads_need_token=True)
    assert not locked.may_read({}, {}) and locked.may_read({}, {
        "cflow_ui_session": locked.open_session()})
    for host in ("127.0.0.1:8700", "localhost:8700", "[::1]:8700", "127.0.0.1", "LOCALHOST"):
        assert access.host_allowed(host), host
    for host in ("evil.example:8700", "127.0.0.1.evil.example", "", "10.0.0.5:8700"):
        assert not access.host_allowed(host), host
    assert locked.host_allowed("console.example.org")  # --auth: any name, token required
    assert operator_problem("john.doe@example") is None
    assert "must be 1 to 64" in (operator_problem("a b") or "")
    assert operator_problem("") is not None
    assert listener_problem("127.0.0.1", False) is None
    assert listener_problem("::1", False) is None
    assert listener_problem("0.0.0.0", True, tls=True) is None
    assert "over plain HTTP" in (listener_problem("0.0.0.0", True) or "")
    assert "without auth" in (listener_problem("10.0.0.5", False) or "")


def test_critical_path_of_the_remaining_work() -> None:
    from cflow.ui.graph import critical_path

    nodes = [("a", "", "completed"), ("b", "", "ready"), ("c", "", "pending"),
             ("d", "", "pending"), ("e", "", "blocked"), ("f", "", "pending"),
             ("x", "", "ready")]
    deps = [("b", "a"), ("c", "b"), ("d", "c"), ("e", "d"), ("f", "e"), ("f", "x")]
    # a is done and e waits for a human: the remaining chain is b -> c -> d.
    assert critical_path(nodes, deps) == ["b", "c", "d"]
    assert critical_path([("a", "", "completed")], []) == []
    assert critical_path([("p", "", "ready"), ("q", "", "ready")], []) == ["p"]  # first made


async def test_an_unexpected_exception_is_a_one_line_error_page(
        caplog: pytest.LogCaptureFixture) -> None:
    """A handler raising something that is no CflowError (here: the console has no
    connection) answers one line, as a page and as JSON, and logs one line."""
    import httpx

    from cflow.ui.app import Console, create_app

    app = create_app(Console(url="nats://x", swarm_name="s", access=Access("t", "op")))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://127.0.0.1") as client:
        page = await client.get("/board")
        api = await client.get("/api/tasks")
        events = await client.get("/events")
    assert page.status_code == 500 and "internal error (AssertionError" in page.text
    assert api.status_code == 500 and api.json()["error"].startswith("internal error")
    assert events.status_code == 500
    assert all("\n" not in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


def test_board_text_filter_matches_percent_and_underscore_literally() -> None:
    import duckdb

    con = duckdb.connect()
    con.execute("CREATE TABLE tasks (task_id TEXT, title TEXT, body TEXT)")
    con.executemany("INSERT INTO tasks VALUES (?, ?, ?)", [
        ("t1", "100% done", ""), ("t2", "1000 done", ""), ("t3", "snake_case", ""),
        ("t4", "snakeXcase", ""), ("t5", r"back\slash", "")])

    def found(text: str) -> list[str]:
        where, args = BoardFilter.parse({"text": text}).where(with_status=False)
        return [r[0] for r in con.execute(f"SELECT task_id FROM tasks{where} ORDER BY 1",
                                          args).fetchall()]

    assert found("100%") == ["t1"]
    assert found("e_c") == ["t3"]
    assert found("k\\s") == ["t5"]
    assert found("done") == ["t1", "t2"]


def test_sessions_expire_and_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from cflow.ui import auth

    access = Access(token="s3cret", operator="dana")
    first = {"cflow_ui_session": access.open_session()}
    monkeypatch.setattr(auth, "MAX_SESSIONS", 3)
    later = [{"cflow_ui_session": access.open_session()} for _ in range(3)]
    assert access.presented({}, first) is None  # the oldest went past the cap
    assert all(access.presented({}, c) == "session" for c in later)
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + auth.SESSION_TTL_S + 1)
    assert access.presented({}, later[-1]) is None  # 8 h later


def test_no_template_carries_an_inline_event_handler() -> None:
    # The console's CSP is script-src 'self': the browser refuses inline handlers
    # (onsubmit=..., onclick=...) and logs the refusal, so behaviour must live in app.js.
    import re
    from pathlib import Path

    import cflow.ui

    templates = Path(cflow.ui.__file__).parent / "templates"
    inline = {path.name: hits for path in sorted(templates.glob("*.html"))
              if (hits := re.findall(r"<[^>]*\son[a-z]+\s*=", path.read_text()))}
    assert inline == {}
