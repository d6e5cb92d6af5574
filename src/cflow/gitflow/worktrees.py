"""A process's own clone of the shared remote, and one git worktree per attempt.

Theory of operation
-------------------
Every worker (and merger) process owns one *area* under
``<root>/areas/<id>/``: a bare repository ``repo.git`` whose ``origin`` is the
shared remote, a ``worktrees/`` directory with one worktree per running attempt,
and a ``lock`` file it holds an exclusive ``flock`` on for as long as it lives.
The kernel drops that lock when the process dies, however it dies, so the next
process to start under the same root recognises an area whose lock it can take
as stale: it adopts it (the clone is kept, saving a full fetch) after deleting
its worktrees, and deletes any further stale areas. kill -9 thus leaves
worktrees behind only until the next start of a worker on that machine.

Repository-level git operations (fetch, worktree add/remove) of one area are
serialised by an ``asyncio.Lock``; the work inside a worktree runs in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import IO

from cflow.gitflow.git import git, remote_heads, require_git


def default_root(remote: str) -> Path:
    """``<data dir>/gitflow/<hash of the remote>``: one root per shared repository."""
    from cflow.server import default_data_dir

    digest = hashlib.sha256(remote.encode()).hexdigest()[:12]
    return default_data_dir() / "gitflow" / digest


def normalize_remote(remote: str) -> str:
    """A local directory becomes an absolute path (git resolves it from other cwds)."""
    path = Path(remote).expanduser()
    if "://" not in remote and not remote.startswith("git@") and path.exists():
        return str(path.resolve())
    return remote


class WorkArea:
    """This process's clone of ``remote`` and the worktrees of its attempts."""

    def __init__(self, remote: str, root: Path | None = None) -> None:
        self.remote = normalize_remote(remote)
        self.root = root or default_root(self.remote)
        self.path: Path | None = None
        self._lock_file: IO[str] | None = None
        self._repo_lock = asyncio.Lock()
        self.cleaned: list[str] = []  # stale areas or worktrees removed at open

    @property
    def repo(self) -> Path:
        assert self.path is not None, "WorkArea.open() first"
        return self.path / "repo.git"

    @property
    def worktrees(self) -> Path:
        assert self.path is not None, "WorkArea.open() first"
        return self.path / "worktrees"

    async def open(self) -> WorkArea:
        """Take (or adopt) an area, clean stale ones, make sure the clone exists.

        Raises:
            GitError: git missing, or the remote cannot be reached.
        """
        require_git()
        if self.path is not None:
            return self  # opened already
        areas = self.root / "areas"
        areas.mkdir(parents=True, exist_ok=True)
        adopted: Path | None = None
        for candidate in sorted(areas.iterdir()):
            if not candidate.is_dir() or candidate.is_symlink():
                continue  # a stray file: not an area, not ours to remove
            handle = _try_lock(candidate / "lock")
            if handle is None:
                continue  # a live process owns it
            killed = _kill_recorded_groups(candidate)  # e.g. a dead merger's check
            self.cleaned.extend(f"process group {pgid}" for pgid in killed)
            if adopted is None and (candidate / "repo.git").is_dir():
                adopted, self._lock_file = candidate, handle
                for stale in (candidate / "worktrees").glob("*"):
                    shutil.rmtree(stale, ignore_errors=True)
                    self.cleaned.append(str(stale))
                continue
            shutil.rmtree(candidate, ignore_errors=True)
            self.cleaned.append(str(candidate))
            handle.close()
        if adopted is None:
            adopted = areas / uuid.uuid4().hex[:12]
            adopted.mkdir()
            self._lock_file = _try_lock(adopted / "lock")
            assert self._lock_file is not None
        self.path = adopted
        self.worktrees.mkdir(exist_ok=True)
        if not (self.repo / "HEAD").exists():
            await git("init", "--quiet", "--bare", str(self.repo))
            await git("remote", "add", "origin", self.remote, cwd=self.repo)
        else:
            await git("remote", "set-url", "origin", self.remote, cwd=self.repo)
        await git("worktree", "prune", cwd=self.repo)
        return self

    def record_group(self, name: str, pgid: int) -> None:
        """Note a process group this area's owner started (killed when the area is adopted
        after its owner died); :meth:`forget_group` once it ended."""
        if self.path is None:
            return
        (self.path / f"{name}.pgid").write_text(f"{pgid} {_start_time(pgid) or ''}")

    def forget_group(self, name: str) -> None:
        if self.path is not None:
            (self.path / f"{name}.pgid").unlink(missing_ok=True)

    def close(self) -> None:
        """Let go of the area (its lock); worktrees still in it are stale from now on."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        self.path = None

    async def heads(self, *refs: str) -> dict[str, str | None]:
        """The remote's commit of each ref (None: absent), fetched into the clone."""
        out = await remote_heads(self.repo, *refs)
        present = [ref for ref, sha in out.items() if sha is not None]
        if present:
            async with self._repo_lock:
                await git("fetch", "--quiet", "--no-tags", "origin",
                          *(f"+{ref}:{tracking(ref)}" for ref in present), cwd=self.repo)
        return out

    async def fetch(self, *refs: str) -> None:
        async with self._repo_lock:
            await git("fetch", "--quiet", "--no-tags", "origin",
                      *(f"+{ref}:{tracking(ref)}" for ref in refs), cwd=self.repo)

    async def add(self, name: str, commit: str, branch: str | None = None) -> Path:
        """A fresh worktree at ``commit`` (on local ``branch`` if given, else detached)."""
        path = self.worktrees / name
        async with self._repo_lock:
            if path.exists():
                await self._remove(path)
            args = ["worktree", "add", "--quiet", "--force"]
            args += ["-B", branch] if branch else ["--detach"]
            await git(*args, str(path), commit, cwd=self.repo)
        return path

    async def reuse(self, name: str, commit: str) -> Path:
        """The worktree ``name`` reset to ``commit`` (detached, no stray files); made if absent."""
        path = self.worktrees / name
        if not (path / ".git").exists():
            return await self.add(name, commit)
        await git("checkout", "--quiet", "--force", "--detach", commit, cwd=path)
        await git("clean", "-q", "-f", "-d", "-x", cwd=path)
        return path

    async def remove(self, path: Path) -> None:
        async with self._repo_lock:
            await self._remove(path)

    async def _remove(self, path: Path) -> None:
        await git("worktree", "remove", "--force", str(path), cwd=self.repo, check=False)
        try:  # not a registered worktree (any more): its files, then its record
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        await git("worktree", "prune", cwd=self.repo, check=False)

    def live_worktrees(self) -> list[str]:
        return sorted(p.name for p in self.worktrees.iterdir()) if self.path else []


def tracking(ref: str) -> str:
    """Where a remote ref is kept in the clone: refs/heads/x -> refs/remotes/origin/x."""
    return "refs/remotes/origin/" + ref.removeprefix("refs/heads/")


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc), None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _kill_recorded_groups(area: Path) -> list[int]:
    """Kill the process groups a dead owner recorded, if their leader is still the same
    process (same start time: a recycled pid is left alone)."""
    killed = []
    for record in area.glob("*.pgid"):
        pgid_text, _, started = record.read_text().partition(" ")
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            pgid = int(pgid_text)
            if started and _start_time(pgid) == started.strip():
                os.killpg(pgid, signal.SIGKILL)
                killed.append(pgid)
        record.unlink(missing_ok=True)
    return killed


def _try_lock(path: Path) -> IO[str] | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


__all__ = ["WorkArea", "default_root", "normalize_remote", "tracking"]
