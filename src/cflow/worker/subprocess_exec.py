"""``cfctl worker --exec CMD``: run each task as a shell command in its own process group.

The command gets the task in its environment (``CFLOW_TASK_ID``, ...; see
:meth:`TaskContext.env`) and the task body on stdin. Exit 0 completes the task
with stdout as the result; any other exit fails the attempt with the tail of
stderr. When the attempt is cancelled (task cancelled, lease lost, worker
stopping) or times out, the whole process group gets SIGTERM, then SIGKILL after
``kill_grace_s``: nothing the command started outlives the attempt.

When the worker itself dies without a chance to clean up (kill -9), Linux sends
the command's shell SIGKILL (``PR_SET_PDEATHSIG``), and the worker's watcher
(:mod:`cflow.worker.guard`) kills the rest of its process group, so a task whose
lease is about to expire does not keep working unseen. Only a process that left
the group (``setsid``, a daemon) escapes; the lease fencing still refuses
anything it reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

from cflow.errors import InvalidInput
from cflow.worker.executor import Outcome, TaskContext, tail_text
from cflow.worker.guard import guard

KILL_GRACE_S = 2.0
PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that makes the child die with the worker (Linux only).

    Everything it needs is looked up here, before any fork: between fork and
    exec the child may only make the one system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    kill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, kill)
        if os.getppid() != parent:  # the worker died before the call took effect
            os._exit(1)

    return preexec


class SubprocessExecutor:
    name = "exec"

    def __init__(self, command: str, *, timeout_s: float | None = None,
                 kill_grace_s: float = KILL_GRACE_S, cwd: str | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        if not command.strip():
            raise InvalidInput("--exec needs a command")
        self.command = command
        self.timeout_s = timeout_s
        self.kill_grace_s = kill_grace_s
        self.cwd = cwd
        self.extra_env = dict(extra_env or {})
        self.pids: set[int] = set()  # running process groups (tests look at these)

    async def check(self) -> None:
        return None

    async def spawn(self, ctx: TaskContext, env: dict[str, str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_shell(
            self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=ctx.workdir or self.cwd,
            start_new_session=True,  # its own process group, killed as a whole
            preexec_fn=_parent_death_signal(),
        )

    def stdin_for(self, ctx: TaskContext) -> bytes | None:
        return ctx.body.encode()

    async def run(self, ctx: TaskContext) -> Outcome:
        env = {**os.environ, **self.extra_env, **ctx.env()}
        # Cancelled while asyncio is still connecting the pipes, asyncio would kill
        # only the shell and then wait for its children to close the pipes. Let the
        # spawn finish, then kill the whole group.
        spawning = asyncio.ensure_future(self.spawn(ctx, env))
        try:
            proc = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                await self._kill(await spawning)
            raise
        self.pids.add(proc.pid)
        guard.watch_group(proc.pid)  # its group dies with this process, even after kill -9
        limit = min(t for t in (self.timeout_s, ctx.timeout_s, float("inf")) if t is not None)
        try:
            try:
                async with asyncio.timeout(None if limit == float("inf") else limit):
                    out, err = await proc.communicate(self.stdin_for(ctx))
            except TimeoutError:
                await self._kill(proc)
                return Outcome(ok=False, error=f"timed out after {limit:g} s", exit_code=None)
        except BaseException:
            await asyncio.shield(self._kill(proc))
            raise
        finally:
            self.pids.discard(proc.pid)
            guard.forget_group(proc.pid)
        return self.interpret(proc.returncode, out, err)

    def interpret(self, code: int | None, out: bytes, err: bytes) -> Outcome:
        """Exit 0 completes with stdout; anything else fails with the tail of stderr."""
        if code == 0:
            return Outcome(ok=True, output=out, exit_code=0)
        if code is not None and code >= 0:
            why = f"exit code {code}"
        else:
            why = f"killed by signal {-(code or 0)}"
        tail = tail_text(err)
        return Outcome(ok=False, output=out, exit_code=code,
                       error=f"{why}: {tail}" if tail else why)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period, reap the child."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                async with asyncio.timeout(self.kill_grace_s):
                    await proc.wait()
                if sig == signal.SIGTERM:
                    # The leader is gone; make sure nothing else of the group lingers.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                return
            except TimeoutError:
                continue
