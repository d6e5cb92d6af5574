"""What every section gets: quick/full, temp dir, servers, child processes, the record."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Child, Children
from bench.servers import Servers
from bench.stats import Record


@dataclass
class Ctx:
    quick: bool
    tmp: Path
    servers: Servers
    children: Children
    rec: Record
    agents: list[Child] = field(default_factory=list)  # reused agent processes
    # The test suite's smoke run (CFLOW_BENCH_SMOKE=1): every figure once, not its spread.
    smoke: bool = field(default_factory=lambda: os.environ.get("CFLOW_BENCH_SMOKE") == "1")

    def reps(self, quick: int, full: int) -> int:
        if not self.quick:
            return full
        return 1 if self.smoke else quick

    def seconds(self, quick: float, full: float) -> float:
        """How long a timed phase runs (a third of the quick time in the smoke run)."""
        if not self.quick:
            return full
        return quick / 3 if self.smoke else quick

    def pick(self, quick: float, full: float) -> float:
        return quick if self.quick else full
