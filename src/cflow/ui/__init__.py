"""The web console: ``cfctl ui`` (or ``cfctl up --ui-port``) serves it.

Layout: :mod:`~cflow.ui.server` connects to the swarm and runs uvicorn;
:mod:`~cflow.ui.app` is the Starlette app (pages, their ``/api`` JSON twins,
server-sent events, the operator's actions); :mod:`~cflow.ui.reads` is every
query it makes on the projection; :mod:`~cflow.ui.live` follows the events
stream for live pages; :mod:`~cflow.ui.auth` (who may read and act) and
:mod:`~cflow.ui.graph` (DAG layout, critical path) are pure;
:mod:`~cflow.ui.operate` is requeue. Templates and static files (htmx, vendored)
live beside them; there is no build step. Nothing in cflow imports this package.
"""

from __future__ import annotations

from cflow.ui.server import serve, serve_for_up

__all__ = ["serve", "serve_for_up"]
