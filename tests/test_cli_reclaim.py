"""A CLI-only swarm on a bare nats-server: no worker, no projector, no `cfctl up` process.

Agents that use only `cfctl` must get reclaim (issue 14 #5) and fencing by holder
identity (issue 14 #7) all the same: every participant here is a short-lived
`cfctl` process, the identity comes from ``CFLOW_AGENT``.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from faults import CFCTL

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

TTL_S = 2.0
LEASE_LOST = 4  # exit code of LeaseLost (and its NotHolder refinement)


def cfctl(env: dict[str, str], agent: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CFCTL, *args], env={**env, "CFLOW_AGENT": agent},
                          capture_output=True, text=True, timeout=60)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args[3:]} -> {proc.returncode}: {proc.stderr}"
    return proc.stdout.strip()


def refused(proc: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """A refusal: non-zero exit and exactly one line on stderr, ``error: ...``."""
    assert proc.returncode != 0, f"{proc.args[3:]} was accepted: {proc.stdout}"
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def timeline(env: dict[str, str], task_id: str) -> list[dict[str, str]]:
    shown = json.loads(ok(cfctl(env, "observer", "--json", "task", "show", task_id)))
    rows: list[dict[str, str]] = shown["timeline"]
    return rows


def test_cli_claimer_reaps_an_expired_claim_and_takes_over(cli_env: dict[str, str]) -> None:
    task = ok(cfctl(cli_env, "admin", "task", "add", "job", "--lease-ttl", f"{TTL_S:g}",
                    "--backoff", "0.1", "--backoff-max", "0.2"))
    old_task, old_epoch = ok(cfctl(cli_env, "old", "task", "claim", task)).split()
    claimed_at = time.monotonic()
    assert old_task == task
    # The old holder never heartbeats (it "died"). While its lease lives, nobody else gets in.
    early = cfctl(cli_env, "new", "task", "claim", task)
    if time.monotonic() - claimed_at < TTL_S * 0.8:
        assert early.returncode != 0 and "old" in early.stderr, early.stderr
    # Then a plain `cfctl task claim` finds the lease gone, reaps it itself and claims.
    deadline = claimed_at + 15.0
    attempts = 0
    while True:
        attempts += 1
        got = cfctl(cli_env, "new", "task", "claim", task)
        if got.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    took = time.monotonic() - claimed_at
    assert got.returncode == 0, (f"`cfctl task claim` by new still refused {took:.1f} s after "
                                 f"old's claim with a {TTL_S:g} s lease ({attempts} tries): "
                                 f"{got.stderr.strip()}")
    print(f"\nCLI-only reclaim: {took:.1f} s after the claim, {attempts} tries (TTL {TTL_S:g} s)")
    # One TTL, plus one cfctl start-up (~1 s) between tries: "about one TTL".
    assert took <= TTL_S + 3.0, f"reclaim took {took:.1f} s for a {TTL_S:g} s lease"
    new_task, new_epoch = got.stdout.split()
    assert new_task == task and int(new_epoch) > int(old_epoch)

    # The old holder's late writes are refused, each with one line and exit 4.
    refused(cfctl(cli_env, "old", "task", "complete", task, "--epoch", old_epoch,
                  "--result", "late"), LEASE_LOST)
    refused(cfctl(cli_env, "old", "task", "heartbeat", task, "--epoch", old_epoch), LEASE_LOST)
    assert ok(cfctl(cli_env, "new", "task", "complete", task, "--epoch", new_epoch,
                    "--result", "done")) == "completed"

    rows = timeline(cli_env, task)
    types = [r["type"] for r in rows]
    assert types.count("TaskLeaseExpired") == 1, types
    assert types.count("TaskClaimed") == 2, types
    completed = [r for r in rows if r["type"] == "TaskCompleted"]
    assert [r["actor"] for r in completed] == ["new"], rows


def test_foreign_agent_with_the_right_epoch_is_refused(cli_env: dict[str, str]) -> None:
    task = ok(cfctl(cli_env, "admin", "task", "add", "job", "--lease-ttl", "30"))
    _, epoch = ok(cfctl(cli_env, "alice", "task", "claim", task)).split()
    # The epoch is public (task show / task list); knowing it must not make Bob the holder.
    for verb, extra in (("complete", ("--result", "stolen")), ("fail", ("--error", "nope")),
                        ("release", ())):
        refused(cfctl(cli_env, "bob", "task", verb, task, "--epoch", epoch, *extra), LEASE_LOST)
    assert ok(cfctl(cli_env, "alice", "task", "heartbeat", task, "--epoch", epoch)) == "ok"
    assert ok(cfctl(cli_env, "alice", "task", "complete", task, "--epoch", epoch,
                    "--result", "mine")) == "completed"
    rows = timeline(cli_env, task)
    assert [r["type"] for r in rows] == ["TaskCreated", "TaskClaimed", "TaskCompleted"], rows
    assert rows[-1]["actor"] == "alice"
