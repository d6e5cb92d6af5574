"""DuckDB projections of a swarm's events: schema, pure fold, projector, query service.

``import cflow.projections`` stays light; the DuckDB-backed pieces live in
:mod:`cflow.projections.store` and :mod:`cflow.projections.projector`, the
NATS query client in :mod:`cflow.projections.query`.
"""

from __future__ import annotations

from cflow.projections.schema import TABLES, VIEWS

__all__ = ["TABLES", "VIEWS"]
