"""The MCP adapter: ``cfctl mcp`` serves the swarm to Claude Code (or any MCP client).

Layout:

* ``runtime``: the process (connect, become the agent, serve stdio or HTTP,
  exit with the client, leases left to expire).
* ``adapter``: the agent's state: held leases and their keep-alives, presence,
  the maintenance loop, the idempotency cache.
* ``server``: nine tools, the ``cflow://schema`` resource, the ``work_next``
  prompt.
* ``faults``: cflow errors to the fixed MCP error codes.
* ``claude``: ``cfctl setup claude``: ``.mcp.json`` and hook entries, merged.

Only the CLI imports this package, and this ``__init__`` imports nothing heavy:
the ``mcp`` SDK loads when a server is built.
"""

from __future__ import annotations
