"""Placeholder; the message service lands shortly."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cflow.swarm import Swarm


class MessageService:
    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm

    async def aclose(self) -> None:
        return None
