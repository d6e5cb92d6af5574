"""`cfctl bench`: run the benchmarks of a source checkout (same as ``python -m bench``).

The benchmarks live in ``bench/`` next to ``src/`` (they are not part of the
installed package), so this command finds the checkout and runs the runner there
in a subprocess with the same interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from cflow.cli.app import EXIT_USAGE, app, fail


def find_checkout(start: Path | None = None) -> Path | None:
    """The directory holding ``bench/__main__.py``: the cwd or one of its parents,
    else the checkout this package was imported from."""
    here = (start or Path.cwd()).resolve()
    for base in (here, *here.parents, Path(__file__).resolve().parents[3]):
        if (base / "bench" / "__main__.py").is_file():
            return base
    return None


@app.command("bench")
def bench(
    quick: bool = typer.Option(False, "--quick", help="Short run (about 90 s), as in CI."),
    only: list[str] = typer.Option(
        [], "--only", help="Run only this section (repeatable)."),
    out: Path | None = typer.Option(None, "--out", help="JSON result file."),
    markdown: Path | None = typer.Option(
        None, "--markdown", help="Also write the table as markdown."),
) -> None:
    """Benchmark cflow against the SQLite design it replaces (ratios, same run)."""
    root = find_checkout()
    if root is None:
        fail("bench/ not found: run `cfctl bench` inside a cflow source checkout", EXIT_USAGE)
    args = [sys.executable, "-m", "bench"]
    if quick:
        args.append("--quick")
    for name in only:
        args += ["--only", name]
    if out is not None:
        args += ["--out", str(out.resolve())]
    if markdown is not None:
        args += ["--markdown", str(markdown.resolve())]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    rc = subprocess.run(args, cwd=root, env=env, check=False).returncode
    raise typer.Exit(rc)
