"""What every executor gets (``TaskContext``) and returns (``Outcome``), and its protocol.

An executor runs one claimed task to the end and reports how it went. It never
talks to NATS: the runtime claims, heartbeats, and records the outcome. The
runtime stops an executor by cancelling the coroutine running
:meth:`Executor.run`; the executor must then stop its work for real (kill the
process group, stop the container) before letting the cancellation through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

#: Results are truncated to this many bytes; the full output is kept elsewhere
#: (see :mod:`cflow.worker.runtime`, "output_ref").
RESULT_CAP_BYTES = 16 * 1024
#: How much of stderr (its tail) a failed attempt records as its error.
ERROR_TAIL_BYTES = 2 * 1024


@dataclass(frozen=True)
class TaskContext:
    """One claimed task, as an executor sees it."""

    task_id: str
    title: str
    body: str
    attempt: int
    epoch: int
    url: str
    swarm: str
    agent: str
    capabilities: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None  # the task's start-to-close timeout, if any
    # Where the task runs (a git worktree with ``--repo``; None: the executor's own
    # choice) and what else its environment carries (branch, previous attempts).
    workdir: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The environment a task's process sees (on top of the worker's own)."""
        return {
            "CFLOW_TASK_ID": self.task_id,
            "CFLOW_TASK_TITLE": self.title,
            "CFLOW_TASK_BODY": self.body,
            "CFLOW_TASK_ATTEMPT": str(self.attempt),
            "CFLOW_EPOCH": str(self.epoch),
            "CFLOW_URL": self.url,
            "CFLOW_SWARM": self.swarm,
            "CFLOW_AGENT": self.agent,
            **self.extra_env,
        }


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended. ``output`` is the full output; ``result`` may be capped."""

    ok: bool
    output: bytes = b""
    error: str | None = None
    exit_code: int | None = None
    cost_usd: float | None = None
    retry: bool = True  # False: fail for good, whatever attempts are left
    result_override: str | None = None  # e.g. claude's final result message

    @property
    def truncated(self) -> bool:
        return self.result_override is None and len(self.output) > RESULT_CAP_BYTES

    @property
    def result(self) -> str:
        if self.result_override is not None:
            return cap_text(self.result_override)
        return cap_text(self.output.decode(errors="replace"))


def cap_text(text: str, cap: int = RESULT_CAP_BYTES) -> str:
    """At most ``cap`` bytes of UTF-8, cut on a character boundary."""
    raw = text.encode()
    if len(raw) <= cap:
        return text
    return raw[:cap].decode(errors="ignore")


def tail_text(data: bytes, cap: int = ERROR_TAIL_BYTES) -> str:
    text = data[-cap:].decode(errors="replace").strip()
    return text


class Executor(Protocol):
    """Runs one task. ``check`` fails fast at worker start (missing binary, no engine)."""

    name: str

    async def check(self) -> None: ...

    async def run(self, ctx: TaskContext) -> Outcome: ...
