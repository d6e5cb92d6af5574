"""The one adapter to the ``git`` binary: run a git command, translate its failure.

Every git call of :mod:`cflow.gitflow` goes through :func:`git`, an
``asyncio`` subprocess with a fixed, non-interactive environment (no prompts, no
pager, no editor, no user config hooks on commit identity), so a worker's event
loop never blocks on git and a failure becomes one :class:`GitError` line.
A push refused because the remote ref is not at the expected commit (the fence)
becomes :class:`PushRefused`, decided by git's porcelain status flag, not by
its message text.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from pathlib import Path

from cflow.errors import CflowError, ConflictError

#: The all-zero object id git uses for "no such ref".
ZERO = "0" * 40
_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_PAGER": "cat",
    "GIT_EDITOR": "true",
    "GIT_MERGE_AUTOEDIT": "no",
    "LC_ALL": "C",
}
IDENTITY = {
    "GIT_AUTHOR_NAME": "cflow",
    "GIT_AUTHOR_EMAIL": "cflow@localhost",
    "GIT_COMMITTER_NAME": "cflow",
    "GIT_COMMITTER_EMAIL": "cflow@localhost",
}


NETWORK_VERBS = frozenset({"ls-remote", "fetch", "push", "clone"})
NETWORK_TIMEOUT_S = 120.0  # a network git command that takes longer is killed

_FENCED = re.compile(r"\[rejected\] \((stale info|fetch first|non-fast-forward)\)")


class GitError(CflowError):
    """A git command failed; ``output`` holds what it printed (its tail)."""

    code = "GIT"


class PushRefused(ConflictError):
    """The remote branch was not at the commit this writer expected (it was fenced off)."""


def require_git() -> str:
    path = shutil.which("git")
    if path is None:
        raise GitError("git is not installed (needed by --repo and the merge queue)")
    return path


async def git(*args: str, cwd: Path | str | None = None, check: bool = True,
              env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
    """Run ``git ARGS`` in ``cwd``; returns stdout (stripped of its last newline).

    Raises:
        GitError: git exited non-zero (with ``check``); the message names the
            command and the last line of its output.
    """
    code, out, err = await git_status(*args, cwd=cwd, env=env, stdin=stdin)
    if check and code != 0:
        raise git_error(args, code, out + err)
    return out.rstrip("\n")


async def git_status(*args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None,
                     stdin: bytes | None = None, timeout_s: float | None = None
                     ) -> tuple[int, str, str]:
    """Run git; returns (exit code, stdout, stderr), whatever the exit code.

    Network verbs (``ls-remote``, ``fetch``, ``push``, ``clone``) get ``NETWORK_TIMEOUT_S``
    unless ``timeout_s`` says otherwise. git runs in a process group of its own; on a
    timeout or cancellation the whole group (ssh, credential helpers) is killed.

    Raises:
        GitError: the command timed out.
    """
    if timeout_s is None and args and args[0] in NETWORK_VERBS:
        timeout_s = NETWORK_TIMEOUT_S
    full_env = {**os.environ, **_ENV, **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        "git", *args, cwd=str(cwd) if cwd is not None else None, env=full_env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        await _kill_group(proc)
        raise GitError(f"git {args[0]} timed out after {timeout_s:g} s", command=list(args),
                       timeout_s=timeout_s) from None
    except BaseException:
        await asyncio.shield(_kill_group(proc))
        raise
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def git_error(args: tuple[str, ...], code: int, output: str) -> GitError:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
    last = (fatal[0] if fatal else lines[-1]) if lines else f"exit code {code}"
    return GitError(f"git {args[0] if args else ''} failed: {last}", command=list(args),
                    exit_code=code, output=output[-4000:])


async def push_fenced(repo: Path | str, commit: str, ref: str, expected: str | None,
                      *, remote: str = "origin") -> None:
    """Set ``remote``'s ``ref`` to ``commit`` only if it is at ``expected`` (None: absent).

    This is the fence of every write to a shared branch: a writer that lost the
    race (another holder or merger moved the ref) is refused, never overwrites.

    Raises:
        PushRefused: the remote ref was not at ``expected``.
        GitError: any other failure (remote unreachable, ...).
    """
    lease = f"--force-with-lease={ref}:{expected or ''}"
    args = ("push", "--porcelain", "--atomic", lease, remote, f"{commit}:{ref}")
    code, out, err = await git_status(*args, cwd=repo)
    if code == 0:
        return
    # Porcelain: one "<flag>\t<from>:<to>\t<summary>" line per ref; "!" = rejected. Only
    # git's own lease / fast-forward refusals are a fence; "[remote rejected] (pre-receive
    # hook declined)" and the like are errors, reported with git's line.
    for line in out.splitlines():
        flag, _, rest = line.partition("\t")
        summary = rest.split("\t")[-1]
        if flag == "!" and ref in rest and _FENCED.match(summary):
            raise PushRefused(f"push to {ref} refused: it is no longer at "
                              f"{(expected or 'absent')[:12]} ({rest.split(chr(9))[-1]})",
                              ref=ref, expected=expected)
    refused = [line.split("\t")[-1] for line in out.splitlines() if line.startswith("!")]
    said = [line.strip() for line in err.splitlines() if line.startswith("remote:")
            and line[7:].strip()]
    if refused:
        raise GitError(f"git push to {ref} refused: {'; '.join(refused)}"
                       + (f" ({said[-1]})" if said else ""), command=list(args),
                       exit_code=code, output=(out + err)[-4000:])
    raise git_error(args, code, out + err)


async def remote_heads(repo: Path | str, *refs: str, remote: str = "origin"
                       ) -> dict[str, str | None]:
    """The commit each ref points at on ``remote`` (one round trip), None when absent."""
    out: dict[str, str | None] = dict.fromkeys(refs)
    listing = await git("ls-remote", remote, *refs, cwd=repo)
    for line in listing.splitlines():
        sha, _, name = line.partition("\t")
        if name in out:
            out[name] = sha
    return out


__all__ = [
    "IDENTITY",
    "ZERO",
    "GitError",
    "PushRefused",
    "git",
    "git_status",
    "push_fenced",
    "remote_heads",
    "require_git",
]
