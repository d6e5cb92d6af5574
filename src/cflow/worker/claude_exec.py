"""``cfctl worker --claude``: each task is a headless ``claude -p`` session.

The prompt is the task's title and body. ``claude`` runs with
``--output-format stream-json --verbose`` (stream-json needs --verbose in print
mode); every stdout line is a JSON message, and the last one of type
``result`` carries the final answer (``result``), whether it is an error
(``is_error``) and the session's cost (``total_cost_usd``), which the worker
records on the completion or failure. ``--max-turns`` and ``--max-budget-usd``
are passed through. A missing ``claude`` binary is reported when the worker
starts, not at its first task.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

from cflow.errors import CflowError, InvalidInput
from cflow.worker.executor import Outcome, TaskContext, tail_text
from cflow.worker.subprocess_exec import SubprocessExecutor, _parent_death_signal


class ClaudeNotInstalled(CflowError):
    code = "CLAUDE_NOT_INSTALLED"


def claude_argv(binary: str, prompt: str, *, max_turns: int | None = None,
                max_budget_usd: float | None = None, extra_args: list[str] | None = None
                ) -> list[str]:
    """The command line of one headless session (pure)."""
    argv = [binary, "-p", prompt, "--output-format", "stream-json", "--verbose"]
    if max_turns is not None:
        argv += ["--max-turns", str(max_turns)]
    if max_budget_usd is not None:
        argv += ["--max-budget-usd", f"{max_budget_usd:g}"]
    return argv + list(extra_args or [])


def final_result(stream: bytes) -> dict[str, Any] | None:
    """The last ``{"type": "result", ...}`` message of a stream-json transcript (pure)."""
    found: dict[str, Any] | None = None
    for line in stream.splitlines():
        line = line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("type") == "result":
            found = msg
    return found


def prompt_of(ctx: TaskContext) -> str:
    return f"{ctx.title}\n\n{ctx.body}".strip()


class ClaudeExecutor(SubprocessExecutor):
    name = "claude"

    def __init__(self, *, binary: str = "claude", max_turns: int | None = None,
                 max_budget_usd: float | None = None, timeout_s: float | None = None,
                 extra_args: list[str] | None = None, cwd: str | None = None) -> None:
        super().__init__(binary, timeout_s=timeout_s, cwd=cwd)
        if max_turns is not None and max_turns < 1:
            raise InvalidInput("--max-turns must be >= 1")
        if max_budget_usd is not None and max_budget_usd <= 0:
            raise InvalidInput("--max-budget-usd must be > 0")
        self.binary = binary
        self.max_turns = max_turns
        self.max_budget_usd = max_budget_usd
        self.extra_args = list(extra_args or [])
        self.path: str | None = None

    async def check(self) -> None:
        """Raises ``ClaudeNotInstalled`` when no ``claude`` binary is on PATH."""
        self.path = shutil.which(self.binary)
        if self.path is None:
            raise ClaudeNotInstalled(
                f"`{self.binary}` not found on PATH: install Claude Code "
                "(npm install -g @anthropic-ai/claude-code) or use --exec/--docker")

    async def spawn(self, ctx: TaskContext, env: dict[str, str]) -> asyncio.subprocess.Process:
        argv = claude_argv(self.path or self.binary, prompt_of(ctx), max_turns=self.max_turns,
                           max_budget_usd=self.max_budget_usd, extra_args=self.extra_args)
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=ctx.workdir or self.cwd or os.getcwd(),
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )

    def stdin_for(self, ctx: TaskContext) -> bytes | None:
        return None

    def interpret(self, code: int | None, out: bytes, err: bytes) -> Outcome:
        final = final_result(out)
        if final is None:
            base = super().interpret(code, out, err)
            why = base.error or "no result message"
            return Outcome(ok=False, output=out, exit_code=code,
                           error=f"claude ended without a result message ({why})")
        cost = final.get("total_cost_usd")
        cost_usd = float(cost) if isinstance(cost, int | float) else None
        text = final.get("result")
        text = text if isinstance(text, str) else json.dumps(final)
        if code == 0 and not final.get("is_error"):
            return Outcome(ok=True, output=out, exit_code=code, cost_usd=cost_usd,
                           result_override=text)
        subtype = final.get("subtype") or "error"
        detail = text or tail_text(err)
        return Outcome(ok=False, output=out, exit_code=code, cost_usd=cost_usd,
                       error=f"claude {subtype}: {detail}"[:2048])
