"""Who may read and who may act (pure: no I/O).

* The console listens on loopback by default. There, reads need no login
  (whoever can reach 127.0.0.1 can already run ``cfctl``).
* Every write needs the console's token, which ``cfctl ui`` prints: as
  ``Authorization: Bearer TOKEN``, or as the session cookie a browser gets from
  the printed ``/login#token=...`` link (the page posts the token; the cookie
  holds a random session id, 8 h at most). A write carried by the cookie must also
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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

COOKIE = "cflow_ui"  # no longer set; cleared on log out
SESSION_COOKIE = "cflow_ui_session"
SESSION_TTL_S = 8 * 3600
MAX_SESSIONS = 1000
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Access:
    token: str
    operator: str
    reads_need_token: bool = False
    secure_cookies: bool = False  # served over TLS (itself or behind a TLS proxy)
    # Browser sessions (the token's, or a NATS user's): random id -> (actor, expiry).
    sessions: dict[str, tuple[str, float]] = field(default_factory=dict, compare=False)

    @property
    def actor(self) -> str:
        return f"ui:{self.operator}"

    def presented(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
        """How the request proves who it is: "bearer", "cookie", "session", or None."""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and _same(auth[7:].strip(), self.token):
            return "bearer"
        if self._session(cookies) is not None:
            return "session"
        return None

    def _session(self, cookies: Mapping[str, str]) -> str | None:
        sid = cookies.get(SESSION_COOKIE, "")
        found = self.sessions.get(sid)
        if found is None:
            return None
        if found[1] <= time.monotonic():
            self.sessions.pop(sid, None)
            return None
        return found[0]

    def identity(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str:
        """The actor a request acts as: the token's operator, or the NATS user it logged in as."""
        if self.presented(headers, cookies) == "session":
            return self._session(cookies) or self.actor
        return self.actor

    def open_session(self, nats_user: str | None = None) -> str:
        """A browser session (for the token's operator, or for someone NATS accepted as
        ``nats_user``); returns its random id, the only thing the cookie holds.

        Sessions end after :data:`SESSION_TTL_S`; past :data:`MAX_SESSIONS` the
        oldest is dropped.
        """
        now = time.monotonic()
        for sid, (_, expires) in list(self.sessions.items()):
            if expires <= now:
                del self.sessions[sid]
        while len(self.sessions) >= MAX_SESSIONS:
            del self.sessions[next(iter(self.sessions))]  # dicts keep insertion order
        sid = secrets.token_urlsafe(24)
        actor = f"nats:{nats_user}" if nats_user else self.actor
        self.sessions[sid] = (actor, now + SESSION_TTL_S)
        return sid

    def token_matches(self, given: str) -> bool:
        return _same(given, self.token)

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
        if how == "session" and headers.get("hx-request", "").lower() != "true":
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


def listener_problem(host: str, reads_need_token: bool, tls: bool = False) -> str | None:
    """Why serving on ``host`` would expose the swarm (None: fine).

    Off loopback every page needs the token (``--auth``), and the token must not
    cross the network in clear text: the console serves TLS itself (``tls``:
    ``--tls-cert``/``--tls-key``) or a TLS proxy in front of it says so
    (``--behind-tls-proxy``, also passed as ``tls``).
    """
    if host in LOOPBACK:
        return None
    if not reads_need_token:
        return (f"refusing to serve the console on {host} without auth: pass --auth (every "
                "page then needs the token) or listen on 127.0.0.1")
    if not tls:
        return (f"refusing to serve the console on {host} over plain HTTP (its token would "
                "cross the network in clear text): pass --tls-cert and --tls-key, or "
                "--behind-tls-proxy when a TLS proxy in front of it terminates HTTPS")
    return None


__all__ = ["COOKIE", "LOOPBACK", "SESSION_COOKIE", "Access", "listener_problem", "operator_problem"]
