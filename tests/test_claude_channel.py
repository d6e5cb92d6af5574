"""A cflow channel push reaching the model through the real `claude` binary.

What gates channels in the binary (2.1.197, read off its bundled JS):
``gateChannelServer`` registers a server's ``notifications/claude/channel`` handler
only if (1) it declares the ``claude/channel`` capability, (2) the provider is
first-party, (3) the GrowthBook feature ``tengu_harbor`` is on (read from
``cachedGrowthBookFeatures`` in ``~/.claude.json``; GrowthBook is consulted at all
only when ``DISABLE_TELEMETRY`` / ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`` /
``DO_NOT_TRACK`` are unset), (4) no managed policy blocks it, (5) the server is in the
session's channel list, and (6) a ``server:`` entry is a *development* channel
(``--dangerously-load-development-channels``). That option is ignored under
``-p`` (it is applied only after an interactive confirmation dialog), and ``-p``
registers channels only for marketplace plugins (the SDK's ``channel_enable``), so
the session here is an interactive one on a pseudo-terminal. The permission relay
(``notifications/claude/channel/permission_request`` to servers declaring
``claude/channel/permission``) needs the GrowthBook feature ``tengu_harbor_permissions``
as well. All outbound traffic other than the loopback stub goes to a dead proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from anthropic_stub import (
    AnthropicStub,
    claude_env,
    prompt_text,
    text,
    tool_results,
    tool_use,
)
from cflow.swarm import Swarm
from test_claude_e2e import BIN, CLAUDE, project
from test_claude_e2e import pytestmark as pytestmark  # the same marks and skip reason

RUN_S = 30.0
KEY = "sk-ant-stub-key"


def channel_env(cli_env: dict[str, str], model_url: str, home: Path, root: Path
                ) -> dict[str, str]:
    env = claude_env(cli_env, model_url, home)
    for key in ("DISABLE_TELEMETRY", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"):
        env.pop(key)  # either one turns GrowthBook, and with it channels, off
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "TERM": "xterm-256color",
                "CFLOW_HOOK_TIMEOUT_S": "20"})
    env.pop("CFLOW_AGENT", None)
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True, "theme": "dark", "numStartups": 5,
        "customApiKeyResponses": {"approved": [KEY[-20:]], "rejected": []},
        "cachedGrowthBookFeatures": {"tengu_harbor": True, "tengu_harbor_permissions": True},
        "projects": {str(root): {"hasTrustDialogAccepted": True,
                                 "hasCompletedProjectOnboarding": True}}}))
    return env


class Tty:
    """An interactive `claude` on a pseudo-terminal; its screen output kept as text."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True, close_fds=True)
        os.close(slave)
        self.out = bytearray()
        self.grew = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                chunk = b""
            with self.grew:
                self.out.extend(chunk)
                self.grew.notify_all()
            if not chunk:
                return

    def screen(self) -> str:
        """The output with the terminal's escape sequences and cursor moves taken out."""
        raw = self.out.decode(errors="replace")
        return re.sub(r"\x1b\[[0-9;?>]*[A-Za-z]|\x1b[78()][A-Z0-9]?", " ", raw)

    def expect(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.grew:
            while needle not in " ".join(self.screen().split()):
                left = deadline - time.monotonic()
                assert left > 0 and self._reader.is_alive(), (
                    f"{needle!r} never shown; screen: {self.screen()[-3000:]}")
                self.grew.wait(left)

    def write(self, data: str) -> None:
        os.write(self.master, data.encode())

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        os.close(self.master)
        self._reader.join(timeout=5)


async def registered(nats_url: str, swarm_name: str, root: Path) -> str:
    """The agent name the session's SessionStart hook registered in the swarm."""
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="lead") as lead:
        deadline = time.monotonic() + RUN_S
        while True:
            names = [a.name for a in await lead.agents.list()
                     if a.labels.get("project") == str(root)]
            if names:
                return names[0]
            assert time.monotonic() < deadline, "the session never registered"
            await asyncio.sleep(0.1)


def channel_blocks(body: dict[str, Any]) -> list[str]:
    return re.findall(r"<channel [^>]*>.*?</channel>", prompt_text(body), re.S)


async def test_a_channel_push_reaches_the_model_and_a_relayed_prompt_is_allowed(
        tmp_path: Path, cli_env: dict[str, str], nats_url: str, swarm_name: str) -> None:
    root = project(tmp_path, cli_env)
    pushed = threading.Event()

    def script(body: dict[str, Any]) -> list[dict[str, Any]]:
        if not channel_blocks(body):
            return [text("nothing pushed yet")]
        pushed.set()
        if not tool_results(body):  # Write is not allowed: its prompt goes to the channel
            return [tool_use("Write", file_path=str(root / "parser.txt"), content="fixed\n")]
        return [text(f"wrote it: {tool_results(body)[-1][1]}")]

    assert CLAUDE is not None
    loop = asyncio.get_running_loop()
    with AnthropicStub(script) as stub:
        env = channel_env(cli_env, stub.url, tmp_path / "home", root)
        tty = Tty([CLAUDE, "--dangerously-load-development-channels", "server:cflow",
                   "--allowedTools", "mcp__cflow"], root, env)
        try:
            await loop.run_in_executor(None, tty.expect, "I am using this for local development",
                                       RUN_S)
            tty.write("\r")  # the binary's own confirmation of a development channel
            agent = await registered(nats_url, swarm_name, root)
            async with Swarm.connect(nats_url, swarm=swarm_name, agent="lead") as lead:
                await lead.messages.join("ops", "permissions")
                # The session listens once it shows its channel banner, but the screen is
                # drawn by cursor moves that a text match cannot always read (letters the
                # last frame already had are skipped): a message every few seconds until
                # the model gets one.
                sent_ids: list[str] = []
                deadline = time.monotonic() + RUN_S
                while not pushed.is_set():
                    assert time.monotonic() < deadline, tty.screen()[-3000:]
                    sent = await asyncio.to_thread(
                        subprocess.run, [f"{BIN}/cfctl", "msg", "send", "--agent", "lead",
                                         agent, "please look at the parser"],
                        env=cli_env, capture_output=True, text=True, timeout=RUN_S,
                        check=False)
                    assert sent.returncode == 0, sent.stderr
                    sent_ids.append(sent.stdout.strip())
                    await loop.run_in_executor(None, pushed.wait, 5.0)
                body = next(b for b in stub.main_requests() if channel_blocks(b))
                block = channel_blocks(body)[0]
                assert any(block.startswith('<channel source="cflow" kind="message" '
                                            f'message_id="{m}" sender="lead"')
                           for m in sent_ids), (block, sent_ids)
                assert "please look at the parser" in block

                # The model answers with a Write the session may not do on its own: the
                # binary's permission prompt is relayed to the swarm, an operator allows it.
                relayed = await lead.messages.inbox("ops", wait_s=RUN_S)
                assert [m.sender for m in relayed] == [agent]
            operator = {**cli_env, "CFLOW_AGENT": "ops"}
            listed = await asyncio.to_thread(
                subprocess.run, [f"{BIN}/cfctl", "--json", "permissions", "list"],
                env=operator, capture_output=True, text=True, timeout=RUN_S, check=True)
            (pending,) = json.loads(listed.stdout)
            assert (pending["agent"], pending["tool_name"]) == (agent, "Write"), pending
            assert not (root / "parser.txt").exists()  # nothing ran before the answer
            allowed = await asyncio.to_thread(
                subprocess.run, [f"{BIN}/cfctl", "permissions", "allow", pending["id"]],
                env=operator, capture_output=True, text=True, timeout=RUN_S, check=False)
            assert allowed.returncode == 0, allowed.stderr
            # The session went on: the tool ran and the model saw its result.
            answered = await asyncio.to_thread(
                stub.wait_main_request, lambda b: any(r[0] == "Write" for r in tool_results(b)),
                RUN_S)
            assert answered is not None, tty.screen()[-3000:]
            assert (root / "parser.txt").read_text() == "fixed\n"
            _, result, failed = next(r for r in tool_results(answered) if r[0] == "Write")
            assert not failed, result
        finally:
            tty.close()
