"""Child processes of a run: JSON lines over stdin/stdout, all stopped in ``close``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Child:
    def __init__(self, proc: asyncio.subprocess.Process, name: str, log_path: Path) -> None:
        self.proc = proc
        self.name = name
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, obj: dict[str, Any] | str) -> None:
        assert self.proc.stdin is not None
        line = obj if isinstance(obj, str) else json.dumps(obj)
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def recv(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.name}: no answer within {timeout:.0f} s "
                               f"({self.tail()})") from None
        if not line:
            await self.proc.wait()
            raise RuntimeError(f"{self.name} exited rc={self.proc.returncode}: {self.tail()}")
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.name}: {msg['error']}")
        return msg

    def tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "empty log"

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, ConnectionError, RuntimeError):
                await self.send({"op": "exit"})
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.kill9()
                await self.proc.wait()


class Children:
    """Every child a run starts; ``close`` stops all of them (used in ``finally``)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[Child] = []

    async def start(self, module: str, name: str, *args: str) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, *args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                cwd=ROOT, limit=64 * 1024 * 1024,
            )
        finally:
            log.close()
        child = Child(proc, name, log_path)
        self.all.append(child)
        return child

    async def close(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.all), return_exceptions=True)
        self.all.clear()

    async def stop(self, children: list[Child]) -> None:
        await asyncio.gather(*(c.stop() for c in children), return_exceptions=True)
        for c in children:
            if c in self.all:
                self.all.remove(c)
