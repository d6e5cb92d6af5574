"""Path reservations: overlap rules (pure), races, expiry, release, the git guard."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cflow.errors import InvalidInput, NotFound
from cflow.reservations import (
    Reservation,
    ReservationConflict,
    ReservationLost,
    normalize_pattern,
    path_covered,
    patterns_overlap,
)
from cflow.streams import names
from cflow.swarm import Swarm

# ------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("src/a.py", "src/a.py"), ("./src//a.py", "src/a.py"), ("src/", "src/**"), (".", "**"),
     ("src\\win.py", "src/win.py")],
)
def test_normalize(raw: str, norm: str) -> None:
    assert normalize_pattern(raw) == norm


@pytest.mark.parametrize("bad", ["", "  ", "/etc/passwd", "src/../secret"])
def test_normalize_refuses(bad: str) -> None:
    with pytest.raises(InvalidInput):
        normalize_pattern(bad)


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("src/a.py", "src/a.py", True),
        ("src/a.py", "src/b.py", False),
        ("src", "src/a.py", True),  # a literal also covers what is below it
        ("src/**", "src/deep/x.py", True),  # '**' crosses '/'
        ("src/*", "src/deep/x.py", False),  # '*' does not
        ("src/**/x.py", "src/x.py", True),  # '**/' may be empty
        ("src/*.py", "src/a.py", True),
        ("src/*.py", "src/a.md", False),
        ("src/*.py", "src/*.md", False),  # suffixes rule it out
        ("src/*.py", "src/api/*", True),
        ("src/*", "docs/*", False),  # prefixes rule it out
        ("**", "anything/at/all", True),
        ("src/a**", "src/ab/c.py", True),
        ("tests/test_*.py", "tests/test_x.py", True),
        ("src", "src/*.py", True),
        ("x", "*/src", True),  # x/src
        ("src/x.py", "src/*.md", False),  # a file against another extension
        ("src/x.py", "src/**/*.md", True),  # src/x.py could be a directory
        ("src/x.py", "src/*", True),
        ("docs", "s*/x", False),
        ("src", "s*/x", True),  # src/x
        ("src", "[rs]rc/*", True),
        ("src", "[!s]rc/*", False),
        ("src/**/*.py", "src/*/test_*.py", True),
    ],
)
def test_overlap_table(a: str, b: str, overlap: bool) -> None:
    assert patterns_overlap(a, b) is overlap
    assert patterns_overlap(b, a) is overlap


_seg = st.sampled_from(["src", "a", "b.py", "c.md", "x"])
_path = st.lists(_seg, min_size=1, max_size=4).map("/".join)
_glob = st.lists(st.sampled_from(["src", "a", "*", "**", "*.py", "b*", "?.md", "x", "[ab]*",
                                  "s?c"]),
                 min_size=1, max_size=4).map("/".join)


@settings(max_examples=500)
@given(_glob, _glob, _path)
def test_overlap_is_conservative(a: str, b: str, path: str) -> None:
    """If one concrete path is covered by both patterns, they must be said to overlap."""
    if path_covered(path, a) and path_covered(path, b):
        assert patterns_overlap(a, b)


# ------------------------------------------------------------------ integration


SWARM_AGENT = "alice"  # the conftest `swarm` fixture acts as this agent


@pytest.mark.integration
async def test_reserve_conflict_names_holder_and_expiry(swarm: Swarm) -> None:
    res = swarm.reservations
    mine = await res.reserve(["src/*.py"], ttl_s=60, task_id="t1")
    assert mine.owner == "alice"
    with pytest.raises(ReservationConflict) as info:
        await res.reserve(["src/api.py"], owner="bob")
    err = info.value
    assert (err.holder, err.reservation_id, err.held_pattern) == ("alice", mine.id, "src/*.py")
    assert err.expires_ms == mine.expires_ms
    assert "alice" in str(err) and "until" in str(err)
    # Disjoint paths and one's own paths are fine.
    await res.reserve(["docs/*"], owner="bob")
    await res.reserve(["src/api.py"], owner="alice")
    assert {r.owner for r in await res.list()} == {"alice", "bob"}
    # Shared vs shared is fine, shared vs exclusive is not.
    await res.reserve(["lib/x.py"], owner="carol", exclusive=False)
    await res.reserve(["lib/*"], owner="dave", exclusive=False)
    with pytest.raises(ReservationConflict):
        await res.reserve(["lib/x.py"], owner="erin")
    # check(): concrete paths held exclusively by someone else.
    blocked = await res.check(["src/api.py", "README.md", "docs/a.md"], owner="carol")
    assert [(p, r.owner) for p, r in blocked] == [("src/api.py", "alice"), ("docs/a.md", "bob")]
    # Release by task, then bob may take it.
    assert await res.release("alice", task_id="t1") == [mine.id]
    with pytest.raises(ReservationConflict):
        await res.reserve(["src/api.py"], owner="bob")  # alice still holds src/api.py itself
    await res.release("alice")
    await res.reserve(["src/api.py"], owner="bob")
    with pytest.raises(NotFound):
        await res.release("alice", reservation_id=mine.id)
    types = [s.event.type for s in await swarm.log.entity_events("reservation", mine.id)]
    assert types == ["PathsReserved", "PathsReleased"]


@pytest.mark.integration
async def test_two_agents_race_for_overlapping_globs_exactly_one_wins(
        nats_url: str, swarm_name: str) -> None:
    for round_ in range(5):
        async with Swarm.connect(nats_url, swarm=swarm_name, agent="a") as a, \
                Swarm.connect(nats_url, swarm=swarm_name, agent="b") as b:
            results = await asyncio.gather(
                a.reservations.reserve([f"r{round_}/src/**"], ttl_s=30),
                b.reservations.reserve([f"r{round_}/src/core/*.py"], ttl_s=30),
                return_exceptions=True)
            wins = [r for r in results if isinstance(r, Reservation)]
            losses = [r for r in results if isinstance(r, ReservationConflict)]
            assert len(wins) == 1 and len(losses) == 1, results
            assert losses[0].holder == wins[0].owner
            assert len(await a.reservations.list()) == round_ + 1


@pytest.mark.integration
async def test_many_racers_one_winner(nats_url: str, swarm_name: str) -> None:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="x") as s:
        results = await asyncio.gather(
            *(s.reservations.reserve(["hot/file.py"], owner=f"agent{i}", ttl_s=30)
              for i in range(12)), return_exceptions=True)
        wins = [r for r in results if isinstance(r, Reservation)]
        assert len(wins) == 1
        assert all(isinstance(r, ReservationConflict) for r in results if r not in wins)
        assert [r.owner for r in await s.reservations.list()] == [wins[0].owner]


@pytest.mark.integration
async def test_expiry_frees_and_fences_renewal(swarm: Swarm) -> None:
    res = swarm.reservations
    held = await res.reserve(["pkg/*"], owner="a", ttl_s=1)
    renewed = await res.renew(held.id, held.revision)
    assert renewed.revision > held.revision
    with pytest.raises(ReservationLost):
        await res.renew(held.id, held.revision)  # stale fencing token
    with pytest.raises(ReservationConflict):
        await res.reserve(["pkg/x.py"], owner="b", ttl_s=5)
    # Await the server's expiry marker for a's key.
    bucket = swarm.log.bucket(names.RESERVATIONS)
    gone = asyncio.get_running_loop().create_future()

    async def on_msg(msg: object) -> None:
        if "Nats-Marker-Reason" in (getattr(msg, "headers", None) or {}) and not gone.done():
            gone.set_result(True)

    sub = await swarm.log.js.subscribe(names.kv_subject(bucket, f"res-{held.id}"), cb=on_msg,
                                       stream=names.kv_stream(bucket), ordered_consumer=True)
    try:
        await asyncio.wait_for(gone, 10)
    finally:
        await sub.unsubscribe()
    won = await res.reserve(["pkg/x.py"], owner="b", ttl_s=5)
    assert [r.id for r in await res.list()] == [won.id]
    with pytest.raises(ReservationLost):
        await res.renew(held.id, renewed.revision)


@pytest.mark.integration
def test_git_guard_refuses_commit_of_reserved_path(cli_env: dict[str, str], tmp_path: Path,
                                                   nats_url: str, swarm_name: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**cli_env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + ":" + env.get("PATH", "")

    def run(*args: str, agent: str = "bob", cwd: Path = repo) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=cwd, env={**env, "CFLOW_AGENT": agent},
                              capture_output=True, text=True, timeout=60, check=False)

    assert run("git", "init", "-q").returncode == 0
    out = run("cfctl", "setup", "git-guard")
    assert out.returncode == 0, out.stderr
    assert (repo / ".git" / "hooks" / "pre-commit").exists()
    assert run("cfctl", "reserve", "src/", "--ttl", "60", agent="alice").returncode == 0
    (repo / "src").mkdir()
    (repo / "src" / "a.py").write_text("x = 1\n")
    (repo / "notes.md").write_text("hi\n")
    run("git", "add", "notes.md")
    ok = run("git", "commit", "-q", "-m", "notes")
    assert ok.returncode == 0, ok.stderr
    run("git", "add", "src/a.py")
    refused = run("git", "commit", "-q", "-m", "src")
    assert refused.returncode != 0
    assert "src/a.py" in refused.stderr and "alice" in refused.stderr
    # alice herself may commit it
    assert run("git", "commit", "-q", "-m", "src", agent="alice").returncode == 0


async def _released(swarm: Swarm, reservation_id: str) -> str:
    """Await the PathsReleased event of one reservation (pushed, no polling)."""
    subject = names.event_subject(swarm.name, "reservation", reservation_id)
    async for item in swarm.log.follow(subject):
        if getattr(item, "event", None) is not None and item.event.type == "PathsReleased":
            return str(item.event.data.reason)
    raise AssertionError("unreachable")


@pytest.mark.integration
async def test_maintenance_releases_when_the_task_finishes(swarm: Swarm) -> None:
    res = swarm.reservations
    task = await swarm.tasks.create("edit the parser")
    lease = await swarm.tasks.claim(task.task_id, agent="w1")
    assert lease is not None
    held = await res.reserve(["src/parser/*"], owner="w1", task_id=task.task_id)
    other = await res.reserve(["docs/*"], owner="w1")
    # Reserved last, so the start-up sweep has looked at the others once it frees this.
    done_before = await swarm.tasks.create("already done")
    lease0 = await swarm.tasks.claim(done_before.task_id, agent="w0")
    assert lease0 is not None
    stale = await res.reserve(["old/*"], owner="w0", task_id=done_before.task_id)
    await lease0.complete("ok")
    maintainer = asyncio.create_task(res.maintain())
    try:
        assert await asyncio.wait_for(_released(swarm, stale.id), 10) == "task finished"
        await lease.complete("parsed")
        assert await asyncio.wait_for(_released(swarm, held.id), 10) == "task completed"
        assert [r.id for r in await res.list()] == [other.id]
    finally:
        maintainer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await maintainer


@pytest.mark.integration
async def test_keep_alive_renews_past_the_ttl_and_reports_loss(swarm: Swarm) -> None:
    res = swarm.reservations
    held = await res.reserve(["lib/*"], owner="a", ttl_s=1)
    lost: asyncio.Future[Reservation] = asyncio.get_running_loop().create_future()
    async with res.keep_alive(held, interval_s=0.3,
                              on_lost=lambda r: lost.done() or lost.set_result(r)):
        await asyncio.sleep(2.5)  # time passing is the point: 2.5 TTLs
        (current,) = await res.list()
        assert current.id == held.id and current.revision > held.revision
        with pytest.raises(ReservationConflict):
            await res.reserve(["lib/x.py"], owner="b")
        assert await res.release("a") == [held.id]
        assert (await asyncio.wait_for(lost, 5)).id == held.id
