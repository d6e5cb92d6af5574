"""Who may read and who may act (pure: no I/O).

* The console listens on loopback by default. There, reads need no login
  (whoever can reach 127.0.0.1 can already run ``cfctl``).
* Every write needs the console's token, which ``cfctl ui`` prints: as
  ``Authorization: Bearer TOKEN``, or as the cookie a browser gets from the
  printed ``/login?token=...`` link. A write carried by the cookie must also
  carry the ``HX-Request`` header that the page's htmx sends: another site can
  make a browser send the cookie but not add that header without a CORS
  preflight, which the console never answers (cross-site request forgery).
* A non-loopback listener is refused unless every request needs the token
  (``--auth``), as ``cfctl up`` refuses an open non-loopback server. Without
  ``--auth`` the console also answers only requests whose ``Host`` is a
  loopback name, so a site re-pointing its DNS name at 127.0.0.1 (DNS
  rebinding) cannot read it through a visitor's browser.

Every write is done as the operator the token belongs to: the events it
appends carry ``ui:<operator>`` as their actor. Instead of the token, a person
may log in with a NATS user of this swarm (``cfctl creds``; the console asks
the NATS server to accept the user and password, and only a server that
requires users counts): their writes then carry ``nats:<user>``.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

COOKIE = "cflow_ui"
SESSION_COOKIE = "cflow_ui_session"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Access:
    token: str
    operator: str
    reads_need_token: bool = False
    # Browser sessions of people who logged in with a NATS user: session id -> actor.
    sessions: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def actor(self) -> str:
        return f"ui:{self.operator}"

    def presented(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
        """How the request proves who it is: "bearer", "cookie", "session", or None."""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and _same(auth[7:].strip(), self.token):
            return "bearer"
        if _same(cookies.get(COOKIE, ""), self.token):
            return "cookie"
        if cookies.get(SESSION_COOKIE, "") in self.sessions:
            return "session"
        return None

    def identity(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str:
        """The actor a request acts as: the token's operator, or the NATS user it logged in as."""
        if self.presented(headers, cookies) == "session":
            return self.sessions[cookies[SESSION_COOKIE]]
        return self.actor

    def open_session(self, nats_user: str) -> str:
        """A browser session for someone NATS accepted as ``nats_user``; returns its id."""
        sid = secrets.token_urlsafe(24)
        self.sessions[sid] = f"nats:{nats_user}"
        return sid

    def host_allowed(self, host: str) -> bool:
        """A loopback console answers only to loopback names: a page of another site
        whose DNS name was re-pointed at 127.0.0.1 (DNS rebinding) must not read it."""
        if self.reads_need_token:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.strip("[]").lower() in LOOPBACK

    def may_read(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        return not self.reads_need_token or self.presented(headers, cookies) is not None

    def write_refusal(self, headers: Mapping[str, str], cookies: Mapping[str, str]
                      ) -> str | None:
        """Why a write is refused (None: allowed)."""
        how = self.presented(headers, cookies)
        if how is None:
            return ("this action needs the console's token (printed by `cfctl ui`): "
                    "open its /login?token=... link, or send Authorization: Bearer TOKEN")
        if how in ("cookie", "session") and headers.get("hx-request", "").lower() != "true":
            return "a write carried by the login cookie must come from the console's own page"
        return None


def _same(given: str, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


_OPERATOR = re.compile(r"[\w.@-]{1,64}")


def operator_problem(name: str) -> str | None:
    """Why ``name`` cannot name the console's operator (None: fine)."""
    if _OPERATOR.fullmatch(name):
        return None
    return (f"operator name {name!r} must be 1 to 64 letters, digits, '_', '.', '@' or '-' "
            "(it becomes the actor ui:NAME of every action)")


def listener_problem(host: str, reads_need_token: bool) -> str | None:
    """Why serving on ``host`` would expose the swarm (None: fine)."""
    if host in LOOPBACK or reads_need_token:
        return None
    return (f"refusing to serve the console on {host} without auth: pass --auth (every "
            "page then needs the token) or listen on 127.0.0.1")


__all__ = ["COOKIE", "LOOPBACK", "SESSION_COOKIE", "Access", "listener_problem", "operator_problem"]
