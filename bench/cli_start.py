"""``uv run python -m bench.cli_start [--runs N] [--bytecode]``: CLI cold start of every
kind of `cfctl` command, each figure beside ``python -c pass`` measured in the same run
(and ``python -c 'import nats'``: what a command that talks to NATS pays first).

Starts its own nats-server (free port, temporary store, sync default), runs each
command ``--runs`` times as a fresh process (the venv's ``cfctl`` entry point, as
a user runs it) and prints median and spread in milliseconds with the goal
(<= 300 ms), and the median CPU time (user + system) of the process, which a
loaded machine disturbs far less than the wall time. Commands that talk to the
server do their whole round trip; ``msgs`` is how many messages (requests and
publishes) one run sent to the server (its monitoring ``in_msgs`` before and after).

By default it measures the environment as installed, which is what a user who
followed the README has: its setup (``uv sync --compile-bytecode``) compiles the
dependencies and the editable install compiles cflow's own sources
(``hatch_build.py``); the header says how much of each is compiled, and whether
Python may write what is missing (with ``PYTHONDONTWRITEBYTECODE`` set, as on the
team's machines, a module without a fresh ``.pyc`` is compiled on every start).
``--bytecode`` ignores what is installed and measures a bytecode cache of its own
instead (a temporary ``PYTHONPYCACHEPREFIX``, filled by the first run of each
command).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

GOAL_MS = 300.0
CFCTL = str(Path(sys.executable).parent / "cfctl")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) milliseconds of one run of ``argv``."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        took = (time.perf_counter() - start) * 1000
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in (0, 3):  # 3: `task claim` found nothing, as asked
            err.seek(0)
            raise SystemExit(f"{argv}: exit {proc.returncode}: {err.read().decode()[-300:]}")
    return took, (usage.ru_utime + usage.ru_stime) * 1000


def compiled_share(package: str) -> float:
    """The share of ``package``'s modules that have a fresh ``.pyc`` beside them (the
    source's mtime and size in its header, as Python checks them)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    assert spec is not None, package
    sources = list(Path(str(spec.origin)).parent.rglob("*.py"))
    fresh = 0
    for source in sources:
        pyc = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
        try:
            header = pyc.read_bytes()[:16]
        except FileNotFoundError:
            continue
        stat = source.stat()
        fresh += header[8:16] == ((int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
                                  + (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little"))
    return fresh / len(sources)


def installed_bytecode(env: dict[str, str]) -> str:
    """What the header says about bytecode in the default mode."""
    shares = ", ".join(f"{package} {compiled_share(package):.0%}"
                       for package in ("cflow", "nats", "typer", "msgspec", "anyio"))
    writes = ("PYTHONDONTWRITEBYTECODE set: the rest is compiled on every start"
              if env.get("PYTHONDONTWRITEBYTECODE")
              else "Python writes the rest on the first start")
    return f"as installed (modules with a fresh .pyc: {shares}); {writes}"


def sent_msgs(monitor: str) -> int:
    """Messages the server has received from clients so far."""
    with urllib.request.urlopen(f"{monitor}/varz", timeout=5) as reply:
        return int(json.load(reply)["in_msgs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--bytecode", action="store_true",
                        help="Measure a bytecode cache of its own (a temporary directory), "
                             "not the bytecode installed.")
    args = parser.parse_args()

    from cflow.server import EmbeddedServer, ServerOptions, free_port

    store = Path(tempfile.mkdtemp(prefix="cflow-bench-cli-"))
    http_port = free_port()
    monitor = f"http://127.0.0.1:{http_port}"
    server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=store, sync="default",
                                          http_port=http_port))
    server.start()
    env = {**os.environ, "CFLOW_URL": server.url, "CFLOW_SWARM": "clistart",
           "XDG_DATA_HOME": str(store)}
    if args.bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(store / "pycache")
    bytecode = ("cached in a temporary PYTHONPYCACHEPREFIX (--bytecode)" if args.bytecode
                else installed_bytecode(env))
    try:
        subprocess.run([CFCTL, "init"], env=env, check=True, capture_output=True)
        subprocess.run([CFCTL, "--swarm", "empty", "init"], env=env, check=True,
                       capture_output=True)
        task = subprocess.run([CFCTL, "task", "add", "seed"], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()
        cases: list[tuple[str, list[str]]] = [
            ("python -c pass (baseline)", [sys.executable, "-c", "pass"]),
            # What any command that talks to NATS pays before cflow's own code runs.
            ("python -c 'import nats' (nats-py)", [sys.executable, "-c", "import nats"]),
            ("cfctl --help", [CFCTL, "--help"]),
            ("cfctl --version", [CFCTL, "--version"]),
            ("cfctl task add --help", [CFCTL, "task", "add", "--help"]),
            ("cfctl task add (to a server)", [CFCTL, "task", "add", "cold start"]),
            ("cfctl task show (whole id)", [CFCTL, "task", "show", task]),
            ("cfctl task show (prefix)", [CFCTL, "task", "show", task[:13]]),
            ("cfctl task list", [CFCTL, "task", "list"]),
            ("cfctl task claim (nothing: exit 3)",
             [CFCTL, "--swarm", "empty", "task", "claim"]),
            ("cfctl memory list", [CFCTL, "memory", "list"]),
            ("cfctl agent list", [CFCTL, "agent", "list"]),
            ("cfctl status", [CFCTL, "status"]),
            ("cfctl setup claude --help", [CFCTL, "setup", "claude", "--help"]),
        ]
        results: list[tuple[str, float, float, float, float, int]] = []
        for label, argv in cases:
            if args.bytecode:
                timed(argv, env)  # fills the cache
            before = sent_msgs(monitor)
            runs = [timed(argv, env) for _ in range(args.runs)]
            msgs = round((sent_msgs(monitor) - before) / args.runs)
            times = [wall for wall, _ in runs]
            results.append((label, statistics.median(times), min(times), max(times),
                            statistics.median(cpu for _, cpu in runs), msgs))
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)
    base = results[0][1]
    load = os.getloadavg()[0]
    print(f"CLI cold start, {args.runs} runs each, load average {load:.1f}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"bytecode: {bytecode}")
    print(f"{'command':<38} {'median':>8} {'spread':>15} {'x baseline':>10} {'CPU':>8} "
          f"{'msgs':>5}  goal")
    for label, median, low, high, cpu, msgs in results:
        goal = "" if label.startswith("python") else (
            f"<= {GOAL_MS:.0f} ms: {'met' if median <= GOAL_MS else 'MISSED'}")
        print(f"{label:<38} {median:>6.0f} ms {low:>6.0f}-{high:<6.0f}ms "
              f"{median / base:>9.1f}x {cpu:>5.0f} ms {msgs:>5}  {goal}")


if __name__ == "__main__":
    main()
