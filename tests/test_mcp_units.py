"""Pure parts of the MCP adapter: error codes, schema compaction, options."""

from __future__ import annotations

import pytest

from cflow import errors
from cflow.errors import InvalidInput
from cflow.mcp.faults import CODES, code_for, describe, describe_error
from cflow.mcp.runtime import parse_http, resolve_agent, resolve_capabilities
from cflow.mcp.server import clip, compact_schema, matches, parse_label

SAMPLES: list[tuple[errors.CflowError, str]] = [
    (errors.NotFound("task", "t1"), "NOT_FOUND"),
    (errors.ConcurrencyConflict("cf.x", 3, 4), "CONFLICT"),
    (errors.AlreadyClaimed("t1", "claimed", "w2"), "CONFLICT"),
    (errors.LeaseLost("t1", 7, "lease expired"), "LEASE_LOST"),
    (errors.InvalidState("task t1 is completed"), "INVALID_STATE"),
    (errors.Paused("swarm", "maintenance"), "INVALID_STATE"),
    (errors.InvalidInput("bad"), "INVALID_ARGUMENT"),
    (errors.DependencyError("cycle"), "INVALID_ARGUMENT"),
    (errors.MalformedEvent("junk"), "INVALID_ARGUMENT"),
    (errors.QueryRejected("not a SELECT"), "QUERY_REJECTED"),
    (errors.LimitExceeded("too many children"), "LIMIT_EXCEEDED"),
    (errors.Unavailable("no server"), "BACKEND_UNAVAILABLE"),
    (errors.ClockOffsetError(10_000, 0, 500), "BACKEND_UNAVAILABLE"),
    (errors.CflowError("something"), "INVALID_STATE"),
]


@pytest.mark.parametrize(("err", "code"), SAMPLES, ids=[type(e).__name__ for e, _ in SAMPLES])
def test_every_error_maps_to_a_fixed_code(err: errors.CflowError, code: str) -> None:
    assert code_for(err) == code and code in CODES
    text = describe_error(err)
    assert text.startswith(f"{code}: ") and ". Hint: " in text and "\n" not in text


def test_describe_refuses_unknown_codes() -> None:
    assert describe("NOT_FOUND", "x  y.\n", "look") == "NOT_FOUND: x y. Hint: look"
    with pytest.raises(ValueError, match="unknown MCP error code"):
        describe("OOPS", "x")


def test_compact_schema() -> None:
    schema = {
        "type": "object", "title": "fArguments",
        "properties": {
            "title": {"title": "Title", "type": "string"},
            "key": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None,
                    "title": "Key", "description": "d"},
            "n": {"anyOf": [{"type": "integer"}, {"type": "string"}], "title": "N"},
        },
        "required": ["title"],
    }
    assert compact_schema(schema) == {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "key": {"type": "string", "description": "d"},
            "n": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
        "required": ["title"],
    }


def test_parse_http() -> None:
    assert parse_http("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_http("localhost:1") == ("localhost", 1)
    assert parse_http("[::1]:9000") == ("::1", 9000)
    for bad in ("0.0.0.0:80", "example.com:80", "127.0.0.1", "127.0.0.1:0", "x:y"):
        with pytest.raises(InvalidInput):
            parse_http(bad)


def test_agent_and_capabilities_resolution() -> None:
    assert resolve_agent("me") == "me"
    assert resolve_agent(None, {"CFLOW_AGENT": "env-agent"}) == "env-agent"
    assert resolve_agent(None, {"CLAUDE_CODE_SESSION_ID": "0123456789",
                                "CLAUDE_PROJECT_DIR": "/p/app"}) == "claude-app-01234567"
    assert resolve_capabilities(["py,docs", "go"]) == ["docs", "go", "py"]
    assert resolve_capabilities([], {"CFLOW_CAPABILITIES": "a b,c"}) == ["a", "b", "c"]


def test_filters_and_clip() -> None:
    from cflow.tasks import TaskState

    s = TaskState(task_id="t", title="Fix Parser", status="ready", seq=1, created_seq=1,
                  created_ms=0, body="the lexer", capabilities=("py",), labels={"team": "a"})
    assert matches(s, status="ready", capability="py", label="team=a", text="LEXER")
    assert not matches(s, status=None, capability=None, label="team=b", text=None)
    assert not matches(s, status=None, capability="go", label=None, text=None)
    assert parse_label("k=v=w") == ("k", "v=w") and parse_label("k") == ("k", None)
    assert clip("abcdef", 4) == "abc…" and clip("ab", 4) == "ab" and clip(None, 4) is None
