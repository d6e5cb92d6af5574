"""Merge analytics: lead time, rejection rate and causes.

Two readings of the same facts: :func:`merge_summary` folds the merge events
(no projector needed, ``cfctl merges --summary``) and :data:`MERGES_SQL` asks
the DuckDB projection's ``events`` table (``cfctl report merges``). Lead time is
from a task chain's first merge request (the original task's) to its merge;
rejections are counted per cause.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `cfctl report` needs only MERGES_SQL: no events, no dataclass
    from cflow.gitflow.queue import MergeRequest

# One row: the same figures as merge_summary, from the projection.
MERGES_SQL = """
WITH req AS (
    SELECT entity_id AS task_id, min(ts) AS requested_at,
           coalesce(max(data->>'origin'), entity_id) AS origin
    FROM events WHERE type = 'MergeRequested' GROUP BY entity_id
), first_req AS (
    SELECT origin, min(requested_at) AS first_at FROM req GROUP BY origin
), merged AS (
    SELECT r.origin, e.ts AS merged_at
    FROM events e JOIN req r ON r.task_id = e.entity_id WHERE e.type = 'Merged'
), rejected AS (
    SELECT data->>'cause' AS cause FROM events WHERE type = 'MergeRejected'
)
SELECT (SELECT count(*) FROM req) AS requests,
       (SELECT count(*) FROM merged) AS merged,
       (SELECT count(*) FROM rejected) AS rejected,
       round((SELECT count(*) FROM rejected) / greatest(1, (SELECT count(*) FROM merged)
             + (SELECT count(*) FROM rejected)), 3) AS rejection_rate,
       (SELECT round(median(epoch(m.merged_at) - epoch(f.first_at)), 3)
          FROM merged m JOIN first_req f USING (origin)) AS lead_time_median_s,
       (SELECT round(max(epoch(m.merged_at) - epoch(f.first_at)), 3)
          FROM merged m JOIN first_req f USING (origin)) AS lead_time_max_s,
       (SELECT string_agg(cause || '=' || n, ', ' ORDER BY cause)
          FROM (SELECT cause, count(*) AS n FROM rejected GROUP BY cause)) AS causes
"""


def merge_summary(requests: Iterable[MergeRequest]) -> dict[str, object]:
    """Requests, merged, rejected, rejection rate, causes, lead times (seconds). Pure."""
    import statistics

    items = list(requests)
    first: dict[str, int] = {}
    for r in items:
        origin = r.origin or r.task_id
        first[origin] = min(first.get(origin, r.requested_ms), r.requested_ms)
    merged = [r for r in items if r.status == "merged"]
    rejected = [r for r in items if r.status == "rejected"]
    leads = [((r.decided_ms or r.requested_ms) - first[r.origin or r.task_id]) / 1000
             for r in merged]
    causes = Counter(r.cause or "?" for r in rejected)
    decided = len(merged) + len(rejected)
    return {
        "requests": len(items),
        "queued": sum(1 for r in items if r.status == "queued"),
        "merged": len(merged),
        "rejected": len(rejected),
        "removed": sum(1 for r in items if r.status == "removed"),
        "rejection_rate": round(len(rejected) / decided, 3) if decided else 0.0,
        "causes": dict(sorted(causes.items())),
        "lead_time_median_s": round(statistics.median(leads), 3) if leads else None,
        "lead_time_max_s": round(max(leads), 3) if leads else None,
    }


__all__ = ["MERGES_SQL", "merge_summary"]
