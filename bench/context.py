"""What every section gets: quick/full, temp dir, servers, child processes, the record."""

from __future__ import annotations

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

    def reps(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def pick(self, quick: float, full: float) -> float:
        return quick if self.quick else full
