"""``python -m cflow.projections [--db PATH] [--batch N]``: a projector without the CLI.

Reads CFLOW_URL and CFLOW_SWARM like ``cfctl``. Stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from cflow.errors import CflowError
from cflow.projections.projector import Projector, run_projector


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(projector: Projector) -> None:
        print(f"projector ready at sequence {projector.applied_seq}", file=sys.stderr,
              flush=True)

    await run_projector(args.url, args.swarm, args.db, stop, batch_max=args.batch,
                        serve_queries=not args.no_query, ready=ready, reap=not args.no_reap)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cflow.projections")
    parser.add_argument("--url", default=os.environ.get("CFLOW_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--swarm", default=os.environ.get("CFLOW_SWARM", "default"))
    parser.add_argument("--db", default=None)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--no-query", action="store_true")
    parser.add_argument("--no-reap", action="store_true",
                        help="do not act as a lease reaper / readiness evaluator")
    args = parser.parse_args()
    try:
        asyncio.run(_main(args))
    except CflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
