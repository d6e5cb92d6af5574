"""What every section gets: quick/full, temp dir, servers, child processes, the record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.procs import Children
from bench.servers import Servers
from bench.stats import Record


@dataclass
class Ctx:
    quick: bool
    tmp: Path
    servers: Servers
    children: Children
    rec: Record

    def reps(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def pick(self, quick: float, full: float) -> float:
        return quick if self.quick else full
