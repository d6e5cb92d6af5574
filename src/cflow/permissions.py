"""Permission prompts relayed from Claude Code sessions to the swarm.

A session's ``cfctl mcp`` posts each prompt as an ack-required message on the
``permissions`` topic; an operator (``cfctl permissions``, the web console) answers
with a reply to that message, which only the relaying session acts on, once.
"""

from __future__ import annotations

import json
from typing import Any

PERMISSION_TOPIC = "permissions"


def decision_text(behavior: str, request_id: str) -> str:
    return f"permission {behavior} {request_id}"


def parse_request(text: str) -> dict[str, str] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or "permission_request" not in data:
        return None
    return {k: str(v) for k, v in data.items()}


def pending_permissions(swarm: Any) -> Any:
    async def pending() -> list[dict[str, Any]]:
        out = []
        # A prompt of a session that is gone can never be answered: not listed.
        present = {a.name for a in await swarm.agents.list()
                   if a.present and a.status != "offline"}
        for m in await swarm.messages.overdue(older_than_s=0.0):
            request = parse_request(m.text) if m.topic == PERMISSION_TOPIC else None
            if request is not None and m.sender in present:
                out.append({"id": request["permission_request"], "message_id": m.id,
                            "agent": m.sender,  # who relayed it, not what the text claims
                            "tool_name": request.get("tool_name", ""),
                            "description": request.get("description", ""),
                            "input_preview": request.get("input_preview", ""),
                            "waiting_s": round(m.overdue_ms / 1000)})
        return out

    return pending()


async def answer_permission(swarm: Any, request_id: str, behavior: str, *,
                            actor: str) -> dict[str, Any]:
    """Send ``behavior`` (allow / deny) for a pending prompt, as ``actor``, and ack it.

    Raises:
        NotFound: no pending prompt with that id (answered already, or never asked).
    """
    import re

    match = [p for p in await pending_permissions(swarm) if p["id"] == request_id]
    if not match:
        from cflow.errors import NotFound

        raise NotFound("pending permission prompt", request_id)
    p = match[0]
    await swarm.messages.send(p["agent"], decision_text(behavior, request_id),
                              reply_to=p["message_id"], importance="high", sender=actor)
    # Acks name a subject token: ui:alice acks as ui-alice.
    await swarm.messages.ack(re.sub(r"[^A-Za-z0-9_-]+", "-", actor).strip("-") or "operator",
                             p["message_id"])
    return {"id": request_id, "agent": p["agent"], "behavior": behavior}


__all__ = ["PERMISSION_TOPIC", "answer_permission", "decision_text", "parse_request",
           "pending_permissions"]
