"""The stdio front of ``cfctl mcp``: answers the handshake at once, forwards the rest.

Claude Code starts a project's MCP servers with the session and, in headless
``claude -p``, does not wait long for them: a server that is still importing the
MCP SDK (0.7 to 1.1 s on a busy machine) when the first model request goes out
leaves that request without cflow's tools. So this module, standard library
only, owns the process's stdin and stdout from the first milliseconds:

* a reader thread answers ``initialize``, ``ping`` and ``tools/list`` itself
  (the tool list is the static :data:`cflow.mcp.catalog.TOOLS`, checked against
  the live server by a test), and queues every other message;
* once the SDK server is built, :meth:`Front.attach` hands it the queue: it sees
  a copy of ``initialize`` (its answer is dropped) and then everything else in
  order; its messages go out through :meth:`Front.write`.

Descriptors 0 and 1 are moved aside at start (0 reads /dev/null, 1 goes to
stderr) so a stray ``print`` or child process never corrupts the protocol, and
the thread reads with ``os.read`` so a blocked read never holds an interpreter
lock at exit.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from cflow.mcp.catalog import INSTRUCTIONS, PROMPTS, RESOURCE_TEMPLATES, RESOURCES, TOOLS

SERVER_INFO = {"name": "cflow", "version": "0.1.0"}
# What the server offers (the SDK server answers the same for the methods behind them).
# `claude/channel` and `claude/channel/permission` are Claude Code's experimental
# capabilities for servers that push messages into a session and relay permission prompts.
CAPABILITIES: dict[str, Any] = {
    "experimental": {"claude/channel": {}, "claude/channel/permission": {}},
    "prompts": {"listChanged": False},
    "resources": {"subscribe": False, "listChanged": False},
    "tools": {"listChanged": False},
}
PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
FORWARDED_INIT_ID = "cflow-front-initialize"
# Client notifications kept until their handler is set (a permission prompt sent
# before the channel opened must not be lost).
HELD_NOTIFICATIONS = frozenset({"notifications/claude/channel/permission_request"})
INIT_WAIT_S = 2.0  # how long the server waits for initialize to learn who its client is
OUT_QUEUE_MAX = 256  # pushes waiting for stdout beyond this are dropped


class Front:
    """The process's MCP wire: early answers from a thread, the rest to the full server."""

    def __init__(self, in_fd: int = 0, out_fd: int = 1, *, divert: bool = True) -> None:
        if divert:
            self.in_fd, self.out_fd = os.dup(in_fd), os.dup(out_fd)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, in_fd)
            os.close(null)
            os.dup2(2, out_fd)
        else:
            self.in_fd, self.out_fd = in_fd, out_fd
        self.started = time.monotonic()
        self.tools_listed_after_s: float | None = None
        self.client: dict[str, Any] = {}
        self.initialized = threading.Event()
        self.closed = threading.Event()
        self._out: collections.deque[bytes] = collections.deque()
        self._out_ready = threading.Condition()
        self._writing = False
        self._writer: threading.Thread | None = None
        self.dropped = 0  # pushes dropped because the client stopped reading
        self._lock = threading.Lock()
        self._pending: list[bytes | None] = []
        self._held: list[tuple[str, dict[str, Any]]] = []  # notifications for a late handler
        # Client notifications handled here, not by the SDK (Claude Code's channel relay).
        self.on_notification: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._sink: Callable[[bytes | None], None] | None = None
        self._thread = threading.Thread(target=self._read, name="mcp-front", daemon=True)

    def start(self) -> Front:
        self._thread.start()
        return self

    # ------------------------------------------------------------------ output

    def write(self, line: str | bytes, *, droppable: bool = False) -> bool:
        """Queue one JSON-RPC message for stdout; never blocks (thread-safe).

        A writer thread does the blocking writes, so a client that stops reading
        stdout stalls only that thread, never the event loop (heartbeats go on).
        A ``droppable`` message (a push) is dropped, and False returned, while
        :data:`OUT_QUEUE_MAX` messages already wait; answers are always kept.
        """
        data = line.encode() if isinstance(line, str) else line
        if not data.endswith(b"\n"):
            data += b"\n"
        with self._out_ready:
            if droppable and len(self._out) >= OUT_QUEUE_MAX:
                self.dropped += 1
                return False
            self._out.append(data)
            self._out_ready.notify()
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_out, name="mcp-front-out",
                                                daemon=True)
                self._writer.start()
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued was written (or the pipe broke)."""
        with self._out_ready:
            return self._out_ready.wait_for(lambda: not self._out and not self._writing,
                                            timeout)

    def _write_out(self) -> None:
        while True:
            with self._out_ready:
                self._writing = False
                self._out_ready.notify_all()
                self._out_ready.wait_for(lambda: bool(self._out))
                data = self._out.popleft()
                self._writing = True
            view = memoryview(data)
            while view:
                try:
                    sent = os.write(self.out_fd, view)
                except OSError:  # the client is gone: nothing more can be written
                    self.closed.set()
                    with self._out_ready:
                        self._out.clear()
                    break
                view = view[sent:]

    def _answer(self, ident: Any, result: dict[str, Any]) -> None:
        self.write(json.dumps({"jsonrpc": "2.0", "id": ident, "result": result},
                              separators=(",", ":")))

    # ------------------------------------------------------------------ input

    def attach(self, sink: Callable[[bytes | None], None]) -> None:
        """From now on hand every forwarded line to ``sink`` (None: end of input)."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._sink = sink
        for item in pending:
            sink(item)

    def handle_notification(self, method: str,
                            handler: Callable[[dict[str, Any]], None]) -> None:
        """Hand ``method`` notifications to ``handler``, first those held until now."""
        with self._lock:
            self.on_notification[method] = handler
            held = [params for m, params in self._held if m == method]
            self._held = [(m, p) for m, p in self._held if m != method]
        for params in held:
            handler(params)

    def detach(self, keep: list[bytes | None]) -> None:
        """Stop forwarding; ``keep`` goes first to the next :meth:`attach`."""
        with self._lock:
            self._sink = None
            self._pending = [*keep, *self._pending]

    def _forward(self, item: bytes | None) -> None:
        with self._lock:
            sink = self._sink
            if sink is None:
                self._pending.append(item)
                return
        sink(item)

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = os.read(self.in_fd, 65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._handle(line)
        except OSError:
            pass
        if buffer.strip():
            self._handle(buffer)
        self.closed.set()
        self._forward(None)

    def _handle(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self._forward(line)  # the SDK answers a parse error
            return
        if isinstance(message, dict) and "id" not in message:
            name = str(message.get("method"))
            given = message.get("params")
            with self._lock:
                handler = self.on_notification.get(name)
                if handler is None and name in HELD_NOTIFICATIONS:
                    # Before the channel is open (NATS still connecting): kept for it.
                    self._held.append((name, given if isinstance(given, dict) else {}))
                    return
            if handler is not None:
                handler(given if isinstance(given, dict) else {})
                return
        if not isinstance(message, dict) or "id" not in message:
            self._forward(line)
            return
        method, ident = message.get("method"), message.get("id")
        raw_params = message.get("params")
        params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
        if method == "initialize":
            self.client = params
            wanted = str(params.get("protocolVersion") or "")
            version = wanted if wanted in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1]
            self._answer(ident, {"protocolVersion": version, "capabilities": CAPABILITIES,
                                 "serverInfo": SERVER_INFO, "instructions": INSTRUCTIONS})
            self.initialized.set()
            copy = {**message, "id": FORWARDED_INIT_ID}
            self._forward(json.dumps(copy).encode())
        elif not self.initialized.is_set():
            self._forward(line)  # no handshake (a stateless 2026 client): the SDK answers all
        elif method == "ping":
            self._answer(ident, {})
        elif method == "tools/list":
            self._answer(ident, {"tools": TOOLS})
            if self.tools_listed_after_s is None:
                self.tools_listed_after_s = time.monotonic() - self.started
        elif method == "prompts/list":
            self._answer(ident, {"prompts": PROMPTS})
        elif method == "resources/list":
            self._answer(ident, {"resources": RESOURCES})
        elif method == "resources/templates/list":
            self._answer(ident, {"resourceTemplates": RESOURCE_TEMPLATES})
        else:
            self._forward(line)


def is_claude_code(client: dict[str, Any]) -> bool:
    """Whether the initialize params come from Claude Code (it names itself claude-code)."""
    info = client.get("clientInfo")
    return isinstance(info, dict) and str(info.get("name", "")).startswith("claude")


def is_forwarded_init_answer(message: dict[str, Any]) -> bool:
    return message.get("id") == FORWARDED_INIT_ID


__all__ = ["CAPABILITIES", "FORWARDED_INIT_ID", "SERVER_INFO", "Front", "is_claude_code",
           "is_forwarded_init_answer"]
