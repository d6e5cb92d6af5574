"""Layout of the dependency DAG for the Graph page (pure: no I/O).

Theory of operation: a layered drawing (Sugiyama, simplified). A task's
*layer* is the length of the longest dependency chain below it, so every edge
points from a lower layer (the dependency, left) to a higher one (right).
Within a layer, nodes are ordered by the mean position of their neighbours in
the previous layer (barycentre), sweeping right then left a few times, which
removes most crossings at the sizes a swarm has (hundreds of nodes). The
result is plain coordinates; the page draws them as SVG, so there is no
JavaScript layout library and the drawing is the same in every browser.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

COL_W = 200
ROW_H = 30
NODE_W = 170
NODE_H = 22
MARGIN = 12
SWEEPS = 4


@dataclass(frozen=True)
class Node:
    id: str
    label: str
    status: str
    layer: int
    row: int
    x: int
    y: int
    critical: bool


@dataclass(frozen=True)
class Edge:
    src: str  # the dependency
    dst: str  # the task that waits for it
    path: str  # SVG path data
    critical: bool


@dataclass(frozen=True)
class Layout:
    nodes: list[Node]
    edges: list[Edge]
    width: int
    height: int


def layers(ids: Sequence[str], deps: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Longest-path layer of each node; ``deps`` are (task, its dependency) pairs.

    Nodes on a cycle (the task service refuses them at creation) end in layer 0.
    """
    known = set(ids)
    below: dict[str, list[str]] = defaultdict(list)  # dependency -> dependents
    indegree = dict.fromkeys(ids, 0)
    for task, dep in deps:
        if task in known and dep in known and task != dep:
            below[dep].append(task)
            indegree[task] += 1
    layer = dict.fromkeys(ids, 0)
    queue = deque(i for i in ids if indegree[i] == 0)
    while queue:
        current = queue.popleft()
        for nxt in below[current]:
            layer[nxt] = max(layer[nxt], layer[current] + 1)
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                queue.append(nxt)
    return layer


DONE = frozenset({"completed", "failed", "cancelled", "blocked"})


def critical_path(nodes: Sequence[tuple[str, str, str]], deps: Iterable[tuple[str, str]]
                  ) -> list[str]:
    """The longest chain of remaining work among ``nodes``, first task first.

    Remaining: not completed, failed, cancelled or blocked (a blocked task waits
    for a human's decision, not for work). Ties go to the chain created first.
    """
    order = {n[0]: i for i, n in enumerate(nodes)}
    live = [n[0] for n in nodes if n[2] not in DONE]
    alive = set(live)
    ups: dict[str, list[str]] = defaultdict(list)
    pairs = [(t, d) for t, d in deps if t in alive and d in alive]
    for task, dep in pairs:
        ups[task].append(dep)
    layer = layers(live, pairs)
    best: dict[str, tuple[int, str | None]] = {}
    for node_id in sorted(live, key=lambda i: (layer[i], order[i])):
        prev = max(ups.get(node_id, []), key=lambda d: (best[d][0], -order[d]), default=None)
        best[node_id] = ((best[prev][0] if prev else 0) + 1, prev)
    if not best:
        return []
    end: str | None = max(best, key=lambda i: (best[i][0], -order[i]))
    chain = []
    while end is not None:
        chain.append(end)
        end = best[end][1]
    return chain[::-1]


def layout(nodes: Sequence[tuple[str, str, str]], deps: Iterable[tuple[str, str]],
           critical: Sequence[str] = ()) -> Layout:
    """Place ``nodes`` (id, label, status) given ``deps`` (task, dependency)."""
    ids = [n[0] for n in nodes]
    dep_list = [(t, d) for t, d in deps]
    layer_of = layers(ids, dep_list)
    columns: dict[int, list[str]] = defaultdict(list)
    for node_id in ids:
        columns[layer_of[node_id]].append(node_id)
    ups: dict[str, list[str]] = defaultdict(list)  # task -> its dependencies
    downs: dict[str, list[str]] = defaultdict(list)  # dependency -> dependents
    for task, dep in dep_list:
        if task in layer_of and dep in layer_of:
            ups[task].append(dep)
            downs[dep].append(task)
    order = {i: pos for col in columns.values() for pos, i in enumerate(col)}
    depth = max(columns, default=0)
    for sweep in range(SWEEPS):
        forward = sweep % 2 == 0
        for level in (range(1, depth + 1) if forward else range(depth - 1, -1, -1)):
            col = columns[level]
            near = ups if forward else downs

            def centre(node_id: str, near: dict[str, list[str]] = near) -> float:
                others = near.get(node_id)
                if not others:
                    return float(order[node_id])
                return sum(order[o] for o in others) / len(others)

            col.sort(key=lambda n: (centre(n), order[n]))
            for pos, node_id in enumerate(col):
                order[node_id] = pos
    on_path = set(critical)
    path_edges = {(critical[i + 1], critical[i]) for i in range(len(critical) - 1)}
    placed: dict[str, Node] = {}
    for node_id, label, status in nodes:
        lay, row = layer_of[node_id], order[node_id]
        placed[node_id] = Node(node_id, label, status, lay, row, MARGIN + lay * COL_W,
                               MARGIN + row * ROW_H, node_id in on_path)
    edges = []
    for task, dep in dep_list:
        a, b = placed.get(dep), placed.get(task)
        if a is None or b is None:
            continue
        x1, y1 = a.x + NODE_W, a.y + NODE_H // 2
        x2, y2 = b.x, b.y + NODE_H // 2
        mid = (x1 + x2) // 2
        edges.append(Edge(dep, task, f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}",
                          (task, dep) in path_edges))
    rows = max((len(c) for c in columns.values()), default=0)
    return Layout(list(placed.values()), edges, width=MARGIN * 2 + (depth + 1) * COL_W,
                  height=MARGIN * 2 + max(1, rows) * ROW_H)


__all__ = ["DONE", "Edge", "Layout", "Node", "critical_path", "layers", "layout"]
