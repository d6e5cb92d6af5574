"""The kill -9 equality test under the batched path at full size (200,000 events).

``uv run python -m bench.projection_chaos [--events N]`` runs
``tests/test_projection.py::test_kill_9_under_the_batched_path`` with
``CFLOW_CHAOS_EVENTS=N`` (default 200,000): ten kill -9s of a projector process
while the events are appended, then the final database must equal a fresh
rebuild, every event applied once. The suite runs the same test with 30,000
events to stay inside its time budget. Prints the pytest outcome and duration.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_projection.py::test_kill_9_under_the_batched_path"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.projection_chaos")
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    env = {**os.environ, "CFLOW_CHAOS_EVENTS": str(args.events)}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cflow-chaos-") as base:
        # Its own base temp dir: the shared /tmp/pytest-of-<user> may be cleaned
        # by another session meanwhile.
        done = subprocess.run([sys.executable, "-m", "pytest", TEST, "-q", "-s",
                               f"--basetemp={base}/t"], cwd=ROOT, env=env, check=False)
    print(f"kill -9 equality at {args.events:,} events: "
          f"{'passed' if done.returncode == 0 else 'FAILED'} in {time.monotonic() - started:.1f} s")
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
