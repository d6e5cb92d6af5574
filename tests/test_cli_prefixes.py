"""Unique id prefixes wherever `cfctl` takes an id (as git does): gates, scopes, messages,
the timeline report; an ambiguous or unknown prefix is one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cflow.cli.ids import pick
from cflow.errors import InvalidInput, NotFound

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]
IDS = ["0193aa01-0000-7000-8000-000000000001", "0193aa01-0000-7000-8000-000000000002",
       "0193bb02-0000-7000-8000-000000000003"]


def cfctl(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CFCTL, *args], env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"cfctl {args} -> {proc.returncode}: {proc.stderr}")
    return proc


def test_pick_takes_a_whole_id_or_a_unique_prefix() -> None:
    assert pick("task", IDS[2], IDS) == IDS[2]
    assert pick("task", "0193b", IDS) == IDS[2]
    assert pick("task", IDS[2][:-1], IDS) == IDS[2]


def test_pick_refuses_ambiguous_and_unknown_prefixes() -> None:
    with pytest.raises(InvalidInput) as caught:
        pick("message", "0193aa", IDS)
    assert str(caught.value) == (f"message id prefix '0193aa' is ambiguous: 2 messages match "
                                 f"({IDS[0]}, {IDS[1]}); give more characters")
    with pytest.raises(NotFound) as missing:
        pick("dependency", "ffff", IDS, noun="task")
    assert str(missing.value) == "dependency not found: ffff"
    with pytest.raises(NotFound):
        pick("task", "0193ab", IDS)


@pytest.mark.e2e
def test_gate_scope_and_message_prefixes(cli_env: dict[str, str]) -> None:
    gate = cfctl(cli_env, "task", "add", "release?", "--gate").stdout.strip()
    approved = cfctl(cli_env, "gate", "approve", gate[:13])
    assert approved.stdout.startswith(f"gate {gate} approved by ")
    unknown = cfctl(cli_env, "gate", "reject", "ffff", check=False)
    assert (unknown.returncode, unknown.stderr) == (5, "error: gate not found: ffff\n")

    parent = cfctl(cli_env, "task", "add", "epic").stdout.strip()
    merged = cfctl(cli_env, "--json", "merge-gate", parent[:13]).stdout
    assert f'"task_id": "{parent}"' in merged
    epoch = cfctl(cli_env, "task", "claim", parent[:13], "--agent", "ann").stdout.split()[1]
    saved = cfctl(cli_env, "task", "checkpoint", parent[:13], "half", "--epoch", epoch,
                  "--agent", "ann")
    assert saved.stdout.startswith(f"checkpoint of {parent} stored")
    paused = cfctl(cli_env, "swarm", "pause", "--scope", parent[:13], "-r", "lunch")
    assert paused.stdout.startswith(f"scope {parent} paused by ")

    first = cfctl(cli_env, "msg", "send", "bob", "hello", "--ack-required").stdout.strip()
    second = cfctl(cli_env, "msg", "send", "bob", "again", "--reply-to", first[:13]
                   ).stdout.strip()
    acked = cfctl(cli_env, "msg", "ack", second[:13], "--agent", "bob")
    assert acked.stdout.strip() == f"acked {second}"
    common = next(i for i in range(36) if first[i] != second[i])  # uuid7s share the time
    ambiguous = cfctl(cli_env, "msg", "ack", first[:common], "--agent", "bob", check=False)
    assert ambiguous.returncode == 1 and ambiguous.stderr.count("\n") == 1
    assert ambiguous.stderr.startswith(
        f"error: message id prefix '{first[:common]}' is ambiguous: 2 messages match")
    unknown = cfctl(cli_env, "msg", "ack", "ffff", "--agent", "bob", check=False)
    assert (unknown.returncode, unknown.stderr) == (5, "error: message not found: ffff\n")
