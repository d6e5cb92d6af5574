"""Task ids from the shell: whole ids in pipes, unique prefixes accepted wherever an id
is taken, ``--json`` anywhere on the line and errors as JSON under it; ``task import``
validation and per-line idempotency. Real `cfctl` subprocesses against the test server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cflow.errors import InvalidInput
from cflow.task_import import parse_task_lines

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


def cfctl(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CFCTL, *args], env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"cfctl {args} -> {proc.returncode}: {proc.stderr}")
    return proc


# ------------------------------------------------------------------ pure: the schema


@pytest.mark.parametrize(("line", "error"), [
    ('{"title": "x", "labels": ["a=b"]}', "f.jsonl:1: labels: expected `object`, got `array`"),
    ('{"title": "x", "prio": 1}', "f.jsonl:1: unknown field `prio`"),
    ('{"title": "x", "priority": "high"}', "f.jsonl:1: priority: expected `int`, got `str`"),
    ('{"body": "no title"}', "f.jsonl:1: missing required field `title`"),
    ('{"title": "x", "after": ["a", 3]}', "f.jsonl:1: after[1]: expected `str`, got `int`"),
    ("not json", "f.jsonl:1: not JSON (Expecting value)"),
    ('{"title": "x", "lease_ttl": 0.5}', "f.jsonl:1: lease_ttl must be at least 1 s"),
])
def test_a_bad_line_is_one_line_naming_it(line: str, error: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_task_lines(line, "f.jsonl")
    assert str(caught.value) == error


def test_keys_follow_the_line_not_the_file() -> None:
    one = parse_task_lines('{"title": "a"}\n{"title": "b"}\n')
    two = parse_task_lines('{"title": "a"}\n\n{"title": "b"}\n{"title": "a"}\n')
    assert [k for _, _, k in one] == [k for _, _, k in two][:2]
    assert two[2][2] != two[0][2]  # the same line twice is two tasks
    assert [n for n, _, _ in two] == [1, 3, 4]


# ------------------------------------------------------------------ real runs


@pytest.mark.e2e
def test_import_validates_first_and_is_idempotent_per_line(cli_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    f = tmp_path / "tasks.jsonl"
    f.write_text('{"id": "a", "title": "build"}\n{"title": "test", "after": ["a"]}\n')
    first = cfctl(cli_env, "task", "import", str(f))
    ids = first.stdout.split()
    assert len(ids) == 2 and first.stderr == f"imported 2 tasks from {f}\n"
    f.write_text(f.read_text() + '{"title": "docs", "labels": ["a=b"]}\n')
    bad = cfctl(cli_env, "task", "import", str(f), check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr == f"error: {f}:3: labels: expected `object`, got `array`\n"
    ghost = tmp_path / "ghost.jsonl"
    ghost.write_text('{"title": "first"}\n{"title": "x", "after": ["nothing-like-it"]}\n')
    missing = cfctl(cli_env, "task", "import", str(ghost), check=False)
    assert missing.returncode == 5
    assert f"{ghost}:2: dependency not found: nothing-like-it" in missing.stderr
    listed = json.loads(cfctl(cli_env, "task", "list", "--json").stdout)
    assert len(listed) == 2  # nothing was created by the bad files
    f.write_text(f.read_text().replace('"labels": ["a=b"]', '"labels": {"a": "b"}'))
    again = cfctl(cli_env, "task", "import", str(f)).stdout.split()
    assert again[:2] == ids and len(again) == 3
    assert len(json.loads(cfctl(cli_env, "--json", "task", "list").stdout)) == 3


@pytest.mark.e2e
def test_prefixes_whole_ids_and_json_anywhere(cli_env: dict[str, str], tmp_path: Path) -> None:
    first = cfctl(cli_env, "task", "add", "write the parser").stdout.strip()
    second = cfctl(cli_env, "task", "add", "test the parser", "--after", first[:13]).stdout.strip()
    listed = cfctl(cli_env, "task", "list").stdout  # a pipe: whole ids, no wrapping
    assert first in listed and second in listed
    shown = json.loads(cfctl(cli_env, "task", "show", second[:13], "--json").stdout)
    assert shown["task_id"] == second and shown["depends_on"] == [first]
    claimed = cfctl(cli_env, "task", "claim", first[:13]).stdout.split()
    assert claimed[0] == first
    assert cfctl(cli_env, "task", "heartbeat", first[:13], "--epoch", claimed[1]
                 ).stdout.strip() == "ok"
    noted = cfctl(cli_env, "task", "note", first[:13], "halfway")
    assert noted.stdout == "" and noted.stderr.startswith(f"noted on task {first} (event ")
    assert cfctl(cli_env, "task", "complete", first[:13], "--epoch", claimed[1]
                 ).stdout.strip() == "completed"
    # a prefix nobody has is not found
    unknown = cfctl(cli_env, "task", "show", "zz", "--json", check=False)
    assert unknown.returncode == 5 and unknown.stdout == ""
    assert json.loads(unknown.stderr) == {"error": "task not found: zz", "exit_code": 5,
                                          "kind": "not_found"}
    assert cfctl(cli_env, "task", "claim").stdout.split()[0] == second
    nothing = cfctl(cli_env, "task", "claim", check=False)
    assert nothing.returncode == 3 and nothing.stdout == ""
    assert nothing.stderr == "nothing to claim\n"
    dep = cfctl(cli_env, "task", "add", "x", "--after", "ghost", check=False)
    assert dep.returncode == 5 and dep.stderr == "error: dependency not found: ghost\n"
    # a prefix two ids share is ambiguous (of 17 ids two share a first hex digit)
    batch = tmp_path / "more.jsonl"
    batch.write_text("".join(f'{{"title": "more {i}"}}\n' for i in range(15)))
    ids = [first, second, *cfctl(cli_env, "task", "import", str(batch)).stdout.split()]
    shared = next(a[0] for a in ids if sum(b.startswith(a[0]) for b in ids) > 1)
    ambiguous = cfctl(cli_env, "task", "show", shared, check=False)
    assert ambiguous.returncode == 1 and "is ambiguous: " in ambiguous.stderr
    assert ambiguous.stderr.count("\n") == 1
