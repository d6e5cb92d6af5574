"""A scripted stand-in for the Anthropic Messages API, on loopback, for the real `claude`.

`claude -p` is pointed at it with ``ANTHROPIC_BASE_URL`` and a dummy
``ANTHROPIC_API_KEY`` (see :func:`claude_env`). It answers ``POST /v1/messages``
the way the binary calls it: a streamed reply (server-sent events
``message_start``, ``content_block_*``, ``message_delta``, ``message_stop``)
when the request says ``"stream": true``, a plain JSON message otherwise.
Every request is recorded (path, headers, JSON body) in :attr:`AnthropicStub.requests`.

What to answer is the test's *script*: a function from the request body to the
reply's content blocks (``{"type": "text", ...}`` or ``{"type": "tool_use",
"name": ..., "input": {...}}``). It is called only for requests that carry
tools (the session's main loop); side requests without tools (titles, topic
detection) get a short text. Scripts are stateless over the conversation: the
helpers below read the transcript in the body (which tool results came back),
so several concurrent sessions can share one stub.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Block = dict[str, Any]
Script = Callable[[dict[str, Any]], list[Block]]


def text(value: str) -> Block:
    return {"type": "text", "text": value}


def tool_use(name: str, **args: Any) -> Block:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": name,
            "input": args}


# ------------------------------------------------------------------ reading a transcript


def tool_results(body: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(tool name, result text, is_error) of every tool call so far, oldest first."""
    names: dict[str, str] = {}
    out: list[tuple[str, str, bool]] = []
    for message in body.get("messages", []):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                names[block["id"]] = block["name"]
            elif block.get("type") == "tool_result":
                inner = block.get("content")
                if isinstance(inner, list):
                    inner = "".join(b.get("text", "") for b in inner if isinstance(b, dict))
                out.append((names.get(block.get("tool_use_id", ""), "?"), str(inner or ""),
                            bool(block.get("is_error"))))
    return out


def last_json(body: dict[str, Any], tool: str) -> dict[str, Any] | None:
    """The JSON answer of the latest call of ``tool`` (None if none or not JSON)."""
    for name, result, _ in reversed(tool_results(body)):
        if name == tool:
            try:
                data = json.loads(result)
            except json.JSONDecodeError:
                return None
            return data if isinstance(data, dict) else None
    return None


def tool_names(body: dict[str, Any]) -> list[str]:
    return [t.get("name", "") for t in body.get("tools", []) if isinstance(t, dict)]


def prompt_text(body: dict[str, Any]) -> str:
    """All user text of the conversation (prompt, reminders, pushed notifications)."""
    parts: list[str] = []
    for message in body.get("messages", []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "text":
                    parts.append(str(block.get("text", "")))
    return "\n".join(parts)


# ------------------------------------------------------------------ the server


class AnthropicStub:
    """A loopback HTTP server answering the Messages API from a script; records requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._recorded = threading.Condition(self._lock)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                stub._record(self.path, dict(self.headers), None)
                self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                           "message": "stub"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode(errors="replace")}
                stub._record(self.path, dict(self.headers), body)
                path = self.path.split("?")[0]
                if path.endswith("/count_tokens"):
                    self._json(200, {"input_tokens": 100})
                    return
                if not path.endswith("/v1/messages"):
                    self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                               "message": "stub"}})
                    return
                try:
                    blocks = stub.reply(body)
                except Exception as exc:  # a broken script shows in the test, not as a hang
                    stub.errors.append(f"{type(exc).__name__}: {exc}; tool results so far: "
                                       f"{tool_results(body)}")
                    blocks = [text(f"stub script failed: {exc}")]
                message = _message(body, blocks)
                if body.get("stream"):
                    self._sse(message)
                else:
                    self._json(200, message)

            def _json(self, status: int, data: dict[str, Any]) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("request-id", f"req_{uuid.uuid4().hex[:16]}")
                self.end_headers()
                self.wfile.write(raw)

            def _sse(self, message: dict[str, Any]) -> None:
                out = b"".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
                               for kind, data in _events(message))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Content-Length", str(len(out)))
                self.send_header("request-id", f"req_{uuid.uuid4().hex[:16]}")
                self.end_headers()
                self.wfile.write(out)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _record(self, path: str, headers: dict[str, str], body: dict[str, Any] | None) -> None:
        with self._recorded:
            self.requests.append({"path": path, "headers": headers, "body": body})
            self._recorded.notify_all()

    def reply(self, body: dict[str, Any]) -> list[Block]:
        if not body.get("tools"):
            return [text("ok")]
        return self.script(body)

    def main_requests(self) -> list[dict[str, Any]]:
        """Bodies of the session's main-loop requests (the ones that carried tools)."""
        with self._lock:
            return self._main_requests()

    def wait_main_request(self, found: Callable[[dict[str, Any]], bool],
                          within: float) -> dict[str, Any] | None:
        """The first main-loop request ``found`` accepts, waiting up to ``within`` seconds
        for one to arrive (None if none did)."""
        def first() -> dict[str, Any] | None:
            return next((b for b in self._main_requests() if found(b)), None)

        with self._recorded:
            return self._recorded.wait_for(first, within)

    def _main_requests(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests
                if r["body"] and r["path"].split("?")[0].endswith("/v1/messages")
                and r["body"].get("tools")]

    def __enter__(self) -> AnthropicStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _message(body: dict[str, Any], blocks: list[Block]) -> dict[str, Any]:
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    return {"id": f"msg_{uuid.uuid4().hex[:20]}", "type": "message", "role": "assistant",
            "model": body.get("model", "claude-stub"), "content": blocks,
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


def _events(message: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The server-sent events of one streamed message, as the real API orders them."""
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**message["usage"], "output_tokens": 1}}
    yield "message_start", {"type": "message_start", "message": start}
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {"type": "text", "text": ""}}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            yield "content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": block["id"],
                                  "name": block["name"], "input": {}}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                      "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": message["stop_reason"],
                                      "stop_sequence": None},
                            "usage": {"output_tokens": message["usage"]["output_tokens"]}}
    yield "message_stop", {"type": "message_stop"}


# ------------------------------------------------------------------ the binary


def claude_binary() -> str | None:
    """The `claude` on PATH, else the repo-local npm prefix `.ci/run` may install into."""
    import shutil

    found = shutil.which("claude")
    if found:
        return found
    local = Path(__file__).resolve().parents[1] / ".cache" / "npm" / "bin" / "claude"
    return str(local) if local.exists() else None


def claude_env(base: dict[str, str], stub_url: str, home: Path) -> dict[str, str]:
    """The environment of an offline `claude -p` talking only to the stub."""
    env = {k: v for k, v in base.items()
           if not k.startswith(("CLAUDE", "ANTHROPIC")) and k != "CLAUDECODE"}
    env.update({
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": stub_url,
        "ANTHROPIC_API_KEY": "sk-ant-stub-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_BUG_COMMAND": "1",
        "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
        "MCP_TIMEOUT": "30000",
        "NO_PROXY": "127.0.0.1,localhost",
    })
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(key, None)
    os.makedirs(home, exist_ok=True)
    return env


__all__ = [
    "AnthropicStub",
    "claude_binary",
    "claude_env",
    "last_json",
    "prompt_text",
    "text",
    "tool_names",
    "tool_results",
    "tool_use",
]
