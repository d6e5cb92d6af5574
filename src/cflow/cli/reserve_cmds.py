"""`cfctl reserve / reservations / release-paths` and `cfctl setup git-guard`."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cflow.cli.app import (
    EXIT_ERROR,
    EXIT_UNAVAILABLE,
    app,
    emit,
    fail,
    group,
    identity,
    plural,
    run,
    say,
    state,
)

if TYPE_CHECKING:
    from cflow.reservations import Reservation

HOOK_MARKER = "# installed by `cfctl setup git-guard`"


setup_app = group("setup", "Wire cflow into agent tools (Claude Code, git).")


def _swarm(ctx: typer.Context, agent: str) -> Any:
    from cflow.swarm import Swarm

    c = state(ctx)
    return Swarm.connect(c.url, swarm=c.swarm, agent=agent)


def _until(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _line(r: Reservation) -> str:
    kind = "exclusive" if r.exclusive else "shared"
    task = f" task {r.task_id}" if r.task_id else ""
    return f"{r.id}  {r.owner}  {kind}  until {_until(r.expires_ms)}{task}  {' '.join(r.patterns)}"


AGENT_OPTION = typer.Option(None, "--agent", help="Owner (default: $CFLOW_AGENT or user@host).")


@app.command("reserve")
def reserve(
    ctx: typer.Context,
    paths: list[str] = typer.Argument(None, help="Paths or globs ('dir/' = the whole tree)."),
    shared: bool = typer.Option(False, "--shared", help="Shared (read) instead of exclusive."),
    ttl: float = typer.Option(300.0, "--ttl", help="Seconds until it expires unless renewed."),
    task: str | None = typer.Option(None, "--task", help="Task it is for (released with it)."),
    renew: str | None = typer.Option(None, "--renew", help="Renew reservation ID instead."),
    agent: str | None = AGENT_OPTION,
) -> None:
    """Reserve paths before editing them; refused if another agent holds them."""
    who = identity(agent)
    if not paths and renew is None:
        fail("give at least one PATH (or --renew ID)", 2)

    async def body() -> Reservation:
        async with _swarm(ctx, who) as swarm:
            res = swarm.reservations
            if renew is not None:
                current = [r for r in await res.list(owner=who) if r.id == renew]
                if not current:
                    from cflow.errors import NotFound

                    raise NotFound("reservation of " + who, renew)
                renewed: Reservation = await res.renew(renew, current[0].revision, ttl_s=ttl)
                return renewed
            made: Reservation = await res.reserve(paths, owner=who, exclusive=not shared,
                                                  ttl_s=ttl, task_id=task)
            return made

    r = run(ctx, body)
    emit(ctx, r.to_dict(), _line(r))


def _staged_paths() -> list[str]:
    try:
        out = subprocess.run(["git", "diff", "--cached", "--name-only", "--no-renames", "-z"],
                             capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        fail(f"cannot list staged files (is this a git repository?): {exc}")
    return [p for p in out.stdout.decode().split("\0") if p]


@app.command("reservations")
def reservations(
    ctx: typer.Context,
    owner: str | None = typer.Option(None, "--owner", help="Only this owner's reservations."),
    check: list[str] = typer.Option([], "--check", help="Check PATH against others' holds."),
    check_staged: bool = typer.Option(False, "--check-staged",
                                      help="Check the files staged in git (pre-commit hook)."),
    agent: str | None = AGENT_OPTION,
) -> None:
    """List live reservations, or check paths (exit 1 if another agent holds one)."""
    who = identity(agent)
    paths = list(check) + (_staged_paths() if check_staged else [])
    if check or check_staged:
        if not paths:
            if state(ctx).json:
                emit(ctx, {"blocked": []})
            say(ctx, "nothing to check")
            return

        async def checking() -> list[tuple[str, Reservation]]:
            async with _swarm(ctx, who) as swarm:
                found: list[tuple[str, Reservation]] = await swarm.reservations.check(
                    paths, owner=who)
                return found

        blocked = run(ctx, checking)
        data = {"blocked": [{"path": p, **r.to_dict()} for p, r in blocked]}
        if state(ctx).json:
            emit(ctx, data)
        elif blocked:
            for p, r in blocked:
                typer.echo(f"{p}: reserved exclusively by {r.owner} until "
                           f"{_until(r.expires_ms)} ({r.id})", err=True)
        else:
            typer.echo(f"ok: none of {plural(len(paths), 'path')} is reserved by another agent",
                       err=True)
        if blocked:
            raise typer.Exit(EXIT_ERROR)
        return

    async def listing() -> list[Reservation]:
        async with _swarm(ctx, who) as swarm:
            found: list[Reservation] = await swarm.reservations.list(owner=owner)
            return found

    rows = run(ctx, listing)

    def human(_: Any) -> None:
        if not rows:
            typer.echo("no reservations", err=True)
        for r in rows:
            typer.echo(_line(r))

    emit(ctx, [r.to_dict() for r in rows], human)


@app.command("release-paths")
def release_paths(
    ctx: typer.Context,
    reservation: str | None = typer.Option(None, "--id", help="Only this reservation."),
    task: str | None = typer.Option(None, "--task", help="Only those taken for this task."),
    agent: str | None = AGENT_OPTION,
) -> None:
    """Release this agent's reservations (all, one, or one task's)."""
    who = identity(agent)

    async def body() -> list[str]:
        async with _swarm(ctx, who) as swarm:
            done: list[str] = await swarm.reservations.release(who, reservation_id=reservation,
                                                               task_id=task)
            return done

    released = run(ctx, body)
    if state(ctx).json:
        emit(ctx, {"released": released})
    say(ctx, f"released {plural(len(released), 'reservation')}")


def hook_script(cfctl: str, url: str, swarm: str) -> str:
    """The pre-commit hook: the url/swarm of install time are defaults, env wins."""
    return f"""#!/bin/sh
{HOOK_MARKER}: refuses commits that touch paths
# another agent reserved exclusively. Unreachable NATS lets the commit through.
CFLOW_URL="${{CFLOW_URL:-{url}}}" CFLOW_SWARM="${{CFLOW_SWARM:-{swarm}}}" \\
  {shlex.quote(cfctl)} reservations --check-staged
rc=$?
if [ "$rc" -eq {EXIT_UNAVAILABLE} ]; then
  echo "cflow git-guard: NATS unreachable, reservations not checked" >&2
  exit 0
fi
exit $rc
"""


def _cfctl_path() -> str:
    argv0 = Path(sys.argv[0])
    if argv0.name == "cfctl" and argv0.exists():
        return str(argv0.resolve())
    import shutil

    return shutil.which("cfctl") or "cfctl"


@setup_app.command("git-guard")
def git_guard(
    ctx: typer.Context,
    repo: Path = typer.Option(Path("."), "--repo", help="The git work tree."),
    force: bool = typer.Option(False, "--force", help="Replace a foreign pre-commit hook."),
) -> None:
    """Install a git pre-commit hook that refuses commits of paths others reserved."""
    try:
        out = subprocess.run(["git", "rev-parse", "--git-path", "hooks"], cwd=repo,
                             capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        fail(f"{repo} is not a git repository")
    hooks = (repo / out.stdout.strip()).resolve()
    hook = hooks / "pre-commit"
    if hook.exists() and HOOK_MARKER not in hook.read_text(errors="replace") and not force:
        fail(f"{hook} exists and is not ours; use --force to replace it")
    c = state(ctx)
    hooks.mkdir(parents=True, exist_ok=True)
    hook.write_text(hook_script(_cfctl_path(), c.url, c.swarm))
    hook.chmod(0o755)
    emit(ctx, {"hook": str(hook)}, f"installed {hook}")
