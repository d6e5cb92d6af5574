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
