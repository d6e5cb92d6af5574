"""The README is executed: its quick-start commands run here as subprocesses.

Convention: a fenced ``bash`` block directly preceded by ``<!-- test: quickstart -->``
in README.md is executed line by line (``\\`` continues a line, ``#`` starts a
comment). To isolate the run, ``uv run cfctl`` becomes this venv's ``cfctl``, the
port in ``--port N`` and in ``127.0.0.1:N`` URLs becomes a free port, and
``--data-dir X`` a temporary directory. ``cfctl up`` must use ``--detach``.
Every command must exit 0; ``--json`` output must parse; ``status --json`` must
show JetStream enabled and the swarm's streams. ``cfctl down`` runs in
``finally`` whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cflow.server import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CFCTL = Path(sys.executable).parent / "cfctl"
MARKER = re.compile(r"<!--\s*test:\s*quickstart\s*-->\s*\n```(?:bash|sh|console)\n(.*?)```",
                    re.DOTALL)

# The canonical quick start; the README's marked block is expected to say the same.
QUICKSTART = """\
uv run cfctl up --detach --port 4222 --data-dir .cflow
uv run cfctl --url nats://127.0.0.1:4222 status --json
uv run cfctl down --data-dir .cflow
"""

pytestmark = pytest.mark.e2e


def readme_text() -> str:
    return README.read_text() if README.exists() else ""


def quickstart_blocks(text: str) -> list[str]:
    return MARKER.findall(text)


def commands(block: str) -> list[str]:
    """Logical command lines of a shell block: comments dropped, ``\\`` joined."""
    out: list[str] = []
    pending = ""
    for raw in block.splitlines():
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending.strip())
    return out


def isolate(command: str, port: int, data_dir: Path) -> list[str]:
    """argv for one README command, pointed at our port, data dir and venv."""
    argv = shlex.split(command)
    if argv[:3] == ["uv", "run", "cfctl"]:
        argv = [str(CFCTL), *argv[3:]]
    elif argv[:1] == ["cfctl"]:
        argv = [str(CFCTL), *argv[1:]]
    else:
        raise AssertionError(f"README quick start runs something other than cfctl: {command}")
    out: list[str] = []
    replace_next: str | None = None
    for arg in argv:
        if replace_next is not None:
            out.append(replace_next)
            replace_next = None
            continue
        if arg == "--port":
            replace_next = str(port)
        elif arg == "--data-dir":
            replace_next = str(data_dir)
        elif arg.startswith("--port="):
            arg = f"--port={port}"
        elif arg.startswith("--data-dir="):
            arg = f"--data-dir={data_dir}"
        out.append(re.sub(r"(127\.0\.0\.1|localhost):\d+", f"127.0.0.1:{port}", arg))
    if "up" in out[1:] and "--detach" not in out:
        raise AssertionError(f"the tested quick start must use `cfctl up --detach`: {command}")
    return out


def run_cli(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=90,
                          check=False)


def check_output(argv: list[str], result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{shlex.join(argv)} -> {result.returncode}: {result.stderr}"
    if "--json" not in argv:
        return
    data: Any = json.loads(result.stdout)
    if "status" in argv:
        assert data["jetstream"]["enabled"] is True
        assert data["server"]["jetstream"] is True
        streams = {s["name"]: s for s in data["streams"]}
        assert "CF_default_EVENTS" in streams
        assert all(s["exists"] for s in streams.values()), streams


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[int, Path, dict[str, str]]]:
    """A free port, a data dir and an environment; stops whatever was started there."""
    port, data_dir = free_port(), tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFLOW_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    try:
        yield port, data_dir, env
    finally:
        if data_dir.exists():
            run_cli([str(CFCTL), "down", "--data-dir", str(data_dir)], env, tmp_path)


def run_block(block: str, port: int, data_dir: Path, env: dict[str, str], cwd: Path) -> None:
    lines = commands(block)
    assert lines, "empty quick-start block"
    for line in lines:
        argv = isolate(line, port, data_dir)
        check_output(argv, run_cli(argv, env, cwd))


# ------------------------------------------------------------------ pure parts


def test_block_parsing_and_isolation(tmp_path: Path) -> None:
    text = "intro\n<!-- test: quickstart -->\n```bash\n# start\n" + QUICKSTART + "```\n"
    (block,) = quickstart_blocks(text)
    lines = commands(block)
    assert len(lines) == 3
    argv = isolate(lines[0], 5555, tmp_path)
    assert argv == [str(CFCTL), "up", "--detach", "--port", "5555", "--data-dir", str(tmp_path)]
    assert isolate(lines[1], 5555, tmp_path)[1:3] == ["--url", "nats://127.0.0.1:5555"]
    assert commands("cfctl a \\\n  --b c\n\n$ cfctl d\n") == ["cfctl a --b c", "cfctl d"]
    with pytest.raises(AssertionError, match="--detach"):
        isolate("uv run cfctl up --port 1", 5555, tmp_path)


# ------------------------------------------------------------------ real runs


def test_cfctl_help_runs() -> None:
    result = subprocess.run([str(CFCTL), "--help"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    for command in ("up", "down", "status"):
        assert re.search(rf"^\W*{command}\b", result.stdout, re.MULTILINE), command


def test_uv_run_cfctl_help_as_the_readme_says() -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the README's commands start with `uv run`)")
    result = subprocess.run([uv, "run", "--frozen", "cfctl", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_quickstart_sequence(sandbox: tuple[int, Path, dict[str, str]], tmp_path: Path) -> None:
    port, data_dir, env = sandbox
    run_block(QUICKSTART, port, data_dir, env, tmp_path)
    # `cfctl down` stopped exactly that server: nothing answers on the port any more.
    status = run_cli([str(CFCTL), "--url", f"nats://127.0.0.1:{port}", "status", "--json"],
                     env, tmp_path)
    assert status.returncode != 0
    assert len(status.stderr.strip().splitlines()) == 1
    assert "cfctl up" in status.stderr


def test_readme_quickstart_block(sandbox: tuple[int, Path, dict[str, str]],
                                 tmp_path: Path) -> None:
    blocks = quickstart_blocks(readme_text())
    if not blocks:
        pytest.skip("README.md has no `<!-- test: quickstart -->` bash block yet "
                    "(snippet: /work/notes/readme_quickstart.md)")
    port, data_dir, env = sandbox
    for block in blocks:
        run_block(block, port, data_dir, env, tmp_path)


def test_readme_names_the_two_commands_and_the_layout() -> None:
    text = readme_text()
    if len(text.splitlines()) < 5:
        pytest.skip("README.md is still a stub")
    assert "uv run pytest" in text
    assert "uv run cfctl" in text
    assert "src/cflow" in text or "cflow/" in text


# ------------------------------------------------------------------ every block

# Every fenced block in README.md is preceded by `<!-- test: KIND -->`; each kind has
# a test below. A block without a marker (or with an unknown kind) fails here.
BLOCK = re.compile(r"(?:<!--\s*test:\s*([\w-]+)\s*-->\s*\n)?```(\w*)\n(.*?)```", re.DOTALL)
KINDS = {"quickstart", "tour", "python", "commands", "layout", "json"}
# Programs other than cfctl that `commands` blocks may name (they are not run here).
OTHER_PROGRAMS = {
    ("pip", "install"): "installs uv",
    ("uv", "sync"): "sets up the environment (.ci/run does the same)",
    ("uv", "run", "pytest"): "the test suite itself",
    ("uv", "run", "python", "-m", "bench"): "bench/, checked by tests/test_bench_smoke.py",
    ("uv", "run", "python", "-m", "bench.cli_start"): "bench/cli_start.py, a benchmark",
    ("claude", "mcp"): "Claude Code's own CLI; `cfctl setup claude --print` prints this line",
    ("cd",): "a shell builtin",
}


def readme_blocks(kind: str | None = None) -> list[tuple[str, str, str]]:
    """(kind, language, text) of every fenced block, in order."""
    found = [(k or "", lang, text) for k, lang, text in BLOCK.findall(readme_text())]
    return [b for b in found if kind is None or b[0] == kind]


def test_every_readme_block_has_a_tested_kind() -> None:
    blocks = readme_blocks()
    assert blocks, "README.md has no code blocks"
    unmarked = [text.splitlines()[0] if text else "" for k, _, text in blocks if k not in KINDS]
    assert not unmarked, f"README blocks without a known `<!-- test: KIND -->`: {unmarked}"
    assert {k for k, _, _ in blocks} >= {"quickstart", "tour", "python"}


def _cfctl_args(words: list[str]) -> list[str] | None:
    """The arguments after `cfctl` / `uv run [--project P] cfctl`, else None."""
    if words[:1] == ["cfctl"]:
        return words[1:]
    if words[:2] == ["uv", "run"]:
        rest = words[2:]
        if rest[:1] == ["--project"]:
            rest = rest[2:]
        if rest[:1] == ["cfctl"]:
            return rest[1:]
    return None


def parse_cfctl(args: list[str]) -> None:
    """Parse a cfctl command line as the CLI would, without running it: unknown
    commands, options and bad values raise a click UsageError."""
    import typer.main

    from cflow.cli import _register
    from cflow.cli.app import app, hoist_global_flags

    _register()
    # What a worker's environment holds (the README shows `"$CFLOW_EPOCH"` and such).
    sample = {"CFLOW_TASK_ID": "01a23508-9799-788a-ab88-42b1c0ffee00", "CFLOW_EPOCH": "7"}
    args = [sample.get(a[1:], a) if a.startswith("$CFLOW_") else a for a in args]
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("cfctl", hoist_global_flags(args), resilient_parsing=False)
    while hasattr(command, "resolve_command") and _pending(ctx):
        name, command, rest = command.resolve_command(ctx, _pending(ctx))
        ctx = command.make_context(name, rest, parent=ctx)


def _pending(ctx: Any) -> list[str]:
    return [*getattr(ctx, "_protected_args", []), *ctx.args]  # click keeps them private


def _shell_commands(block: str) -> list[list[str]]:
    out = []
    for line in commands(block):
        for part in re.split(r"\s*(?:;|&&|\|)\s*", line.split(" #")[0]):
            if part.strip():
                out.append(shlex.split(part, comments=True))
    return [w for w in out if w]


def test_readme_command_blocks_parse() -> None:
    checked = 0
    for _, _, block in readme_blocks("commands"):
        for words in _shell_commands(block):
            args = _cfctl_args(words)
            if args is None:
                assert any(tuple(words[:len(k)]) == k for k in OTHER_PROGRAMS), words
                continue
            parse_cfctl(args)
            checked += 1
    assert checked >= 10


def test_parse_cfctl_refuses_what_the_cli_refuses() -> None:
    from typer._click.exceptions import UsageError  # Typer vendors its click

    parse_cfctl(["task", "add", "x", "--priority", "3", "--json"])
    for bad in (["task", "ad", "x"], ["task", "add", "x", "--priority", "high"],
                ["up", "--no-such-option"]):
        with pytest.raises(UsageError):
            parse_cfctl(bad)


def test_readme_layout_names_files_that_exist() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    names = {Path(p).name for p in tracked} | {part + "/" for p in tracked
                                               for part in Path(p).parts[:-1]}
    (_, _, block), = readme_blocks("layout")
    for line in block.splitlines():
        first = re.split(r"\s{2,}", line.strip())[0]
        for token in re.split(r"[,\s]+", first):
            if re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", token) and token.endswith(
                    (".py", ".toml", ".lock", "/")):
                assert Path(token).name in names or token.split("/")[-2] + "/" in names, token


def test_readme_json_block_is_what_setup_claude_writes() -> None:
    (_, _, block), = readme_blocks("json")
    entry = json.loads(block)["mcpServers"]["cflow"]
    assert entry["type"] == "stdio" and entry["args"] == ["mcp"]
    assert set(entry["env"]) == {"CFLOW_URL", "CFLOW_SWARM"}


def test_readme_python_runs_as_a_script(cli_env: dict[str, str], tmp_path: Path) -> None:
    (_, _, code), = readme_blocks("python")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], env=cli_env, capture_output=True,
                          text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("completed ")


async def test_readme_tour_runs_against_a_server(cli_env: dict[str, str], nats_url: str,
                                                 swarm_name: str, tmp_path: Path) -> None:
    import asyncio

    from cflow.projections.projector import run_projector

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    (_, _, tour), = readme_blocks("tour")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    script = tmp_path / "tour.sh"
    script.write_text("set -euo pipefail\n" + tour)
    stop = asyncio.Event()
    projector = asyncio.create_task(run_projector(nats_url, swarm_name, tmp_path / "p.duckdb",
                                                  stop))
    try:
        proc = await asyncio.create_subprocess_exec(
            bash, str(script), cwd=tmp_path, env=cli_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 180)
    finally:
        stop.set()
        await asyncio.wait_for(projector, 30)
    assert proc.returncode == 0, f"{err.decode()}\n{out.decode()}"
    assert "Traceback" not in err.decode()
    assert list((tmp_path / "out").glob("*.parquet"))
