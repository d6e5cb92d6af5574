"""Per-agent NATS credentials and the server's accounts/users configuration.

Theory of operation: every swarm is its own NATS **account**, so one swarm's
subjects, streams and inboxes do not exist for another swarm's users (a
stream of swarm A cannot even *source* one of swarm B without an explicit
export). Inside the account, an agent user gets an allow-list of the subjects
cflow needs (its swarm's event/message subjects, its KV buckets, the JetStream
API calls on its own streams, its inboxes) and an explicit deny of every
destructive JetStream call (stream delete, purge, message delete, snapshot,
restore). An ``admin`` user has the whole account.

The registry (``users.json``, mode 0600) is the source of truth; ``auth.conf``
is rendered from it and included by the server config (``cfctl up --auth``).
Cluster routes authenticate with a route user kept in the same registry, so a
machine that joins needs a copy of that directory. The nkeys package is not a
dependency, so users are username + password (random, 128 bits); keep the
directory private.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from cflow.errors import InvalidInput, NotFound
from cflow.events import check_token
from cflow.streams.definitions import swarm_resources

REGISTRY = "users.json"
HUB_DOMAIN = "cflow"  # the JetStream domain cflow hubs use (cflow.server.HUB_DOMAIN)
AUTH_CONF = "auth.conf"

# Destructive JetStream calls no agent may make (the admin user of a swarm may).
DENIED_API = (
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.SNAPSHOT.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.STREAM.PEER.REMOVE.>",
    "$JS.API.STREAM.LEADER.STEPDOWN.>",
    "$JS.API.ACCOUNT.PURGE.>",
    "$JS.API.META.>",
    "$JS.API.SERVER.>",
)


@dataclass
class User:
    name: str  # the NATS user name: "<swarm>.<agent>"
    agent: str
    swarm: str
    password: str
    admin: bool = False
    capabilities: list[str] = field(default_factory=list)


@dataclass
class Registry:
    route_user: str
    route_password: str
    users: list[User] = field(default_factory=list)

    @classmethod
    def new(cls) -> Registry:
        return cls(route_user="cflow-route", route_password=secrets.token_urlsafe(24))

    def swarms(self) -> list[str]:
        return sorted({u.swarm for u in self.users})

    def find(self, name: str) -> User | None:
        return next((u for u in self.users if u.name == name), None)

    def admin_for(self, swarm: str) -> User | None:
        return next((u for u in self.users if u.swarm == swarm and u.admin), None)


def user_name(swarm: str, agent: str) -> str:
    check_token(swarm, "swarm")
    check_token(agent, "agent")
    return f"{swarm}.{agent}"


def agent_permissions(swarm: str) -> dict[str, Any]:
    """The subject permissions of an agent of ``swarm`` (pure).

    Publish: the swarm's subjects, its KV buckets, the JetStream API calls on its
    own streams (info, create/update, reads, consumers, acks, flow control) and
    replies to inboxes. Subscribe: the swarm's subjects and inboxes. Every
    destructive call is denied explicitly, whatever the allow-list says.
    """
    specs = swarm_resources(swarm)
    publish = [f"cf.{swarm}.>", "$JS.API.INFO", "$JS.API.STREAM.NAMES", "_INBOX.>"]
    subscribe = [f"cf.{swarm}.>", "_INBOX.>"]
    for spec in specs:
        n = spec.name
        if spec.kv:
            publish += list(spec.subjects)
            subscribe += list(spec.subjects)
        publish += [
            f"$JS.API.STREAM.INFO.{n}",
            f"$JS.API.STREAM.CREATE.{n}",
            f"$JS.API.STREAM.UPDATE.{n}",
            f"$JS.API.STREAM.MSG.GET.{n}",
            f"$JS.API.DIRECT.GET.{n}",
            f"$JS.API.DIRECT.GET.{n}.>",
            f"$JS.API.CONSUMER.CREATE.{n}",
            f"$JS.API.CONSUMER.CREATE.{n}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{n}.>",
            f"$JS.API.CONSUMER.INFO.{n}.>",
            f"$JS.API.CONSUMER.DELETE.{n}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{n}.>",
            f"$JS.API.CONSUMER.NAMES.{n}",
            f"$JS.API.CONSUMER.LIST.{n}",
            f"$JS.ACK.{n}.>",
            f"$JS.FC.{n}.>",
        ]
    # A leaf node maps `$JS.API.>` onto the hub's domain: the same calls arrive
    # as `$JS.<domain>.API.>` and get the same allow/deny.
    # KV writes through a leaf likewise arrive as `$JS.<domain>.API.$KV.<bucket>.>`.
    def in_domain(subjects: list[str]) -> list[str]:
        out = []
        for s in subjects:
            if s.startswith("$JS.API."):
                out.append(s.replace("$JS.API.", f"$JS.{HUB_DOMAIN}.API.", 1))
            elif s.startswith("$KV."):
                out.append(f"$JS.{HUB_DOMAIN}.API.{s}")
        return out

    deny = list(DENIED_API)
    return {
        "publish": {"allow": publish + in_domain(publish), "deny": deny + in_domain(deny)},
        "subscribe": {"allow": subscribe},
    }


def _q(value: str) -> str:
    return json.dumps(value)


def _list(items: list[str], indent: str) -> str:
    inner = ",\n".join(f"{indent}  {_q(i)}" for i in items)
    return f"[\n{inner}\n{indent}]"


def render_auth_conf(reg: Registry) -> str:
    """The ``accounts`` block for every swarm in the registry (pure).

    Each swarm is an account with JetStream enabled; users carry their subject
    permissions (admins have none, i.e. the whole account).
    """
    lines = [
        "# written by `cfctl creds`; edit with `cfctl creds create/revoke`, not by hand.",
        "# One account per swarm: swarms cannot see each other's subjects or streams.",
        "accounts {",
    ]
    for swarm in reg.swarms():
        lines += [f"  {_q(swarm)}: {{", "    jetstream: enabled", "    users: ["]
        for user in (u for u in reg.users if u.swarm == swarm):
            lines.append(f"      {{ user: {_q(user.name)}, password: {_q(user.password)}")
            if not user.admin:
                perms = agent_permissions(swarm)
                ind = "          "
                lines += [
                    "        permissions: {",
                    "          publish: {",
                    f"            allow: {_list(perms['publish']['allow'], ind + '  ')}",
                    f"            deny: {_list(perms['publish']['deny'], ind + '  ')}",
                    "          }",
                    "          subscribe: {",
                    f"            allow: {_list(perms['subscribe']['allow'], ind + '  ')}",
                    "          }",
                    "        }",
                ]
            lines.append("      }")
        lines += ["    ]", "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ files


def load(directory: Path) -> Registry:
    """Read the registry; a directory without one gets a fresh (empty) registry."""
    path = directory / REGISTRY
    if not path.exists():
        return Registry.new()
    try:
        raw = json.loads(path.read_text())
        users = [User(**u) for u in raw.get("users", [])]
        return Registry(raw["route_user"], raw["route_password"], users)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"unreadable credentials registry {path}: {exc}") from None


def save(directory: Path, reg: Registry) -> Path:
    """Write ``users.json`` and ``auth.conf`` (both 0600); returns the conf path."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    body = {
        "route_user": reg.route_user,
        "route_password": reg.route_password,
        "users": [asdict(u) for u in reg.users],
    }
    _write_private(directory / REGISTRY, json.dumps(body, indent=2) + "\n")
    conf = directory / AUTH_CONF
    _write_private(conf, render_auth_conf(reg))
    return conf


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def create(directory: Path, agent: str, swarm: str, *, capabilities: list[str] | None = None,
           admin: bool = False, rotate: bool = False) -> User:
    """Issue (or return) the user of ``agent`` in ``swarm`` and rewrite auth.conf.

    An existing user keeps its password unless ``rotate``.

    Raises:
        InvalidInput: swarm or agent is not a subject token.
    """
    for cap in capabilities or []:
        check_token(cap, "capability")
    reg = load(directory)
    name = user_name(swarm, agent)
    user = reg.find(name)
    if user is None:
        user = User(name=name, agent=agent, swarm=swarm, password=secrets.token_urlsafe(16))
        reg.users.append(user)
    elif rotate:
        user.password = secrets.token_urlsafe(16)
    user.admin = admin
    user.capabilities = sorted(set(capabilities or []))
    save(directory, reg)
    return user


def revoke(directory: Path, name: str) -> None:
    """Remove one user (``<swarm>.<agent>``) and rewrite auth.conf.

    Raises:
        NotFound: no such user.
    """
    reg = load(directory)
    user = reg.find(name)
    if user is None:
        raise NotFound("user", name)
    reg.users.remove(user)
    save(directory, reg)


def registry_for_conf(auth_conf: Path) -> Registry | None:
    """The registry next to an ``auth.conf`` written by ``cfctl creds`` (None if absent)."""
    if not (auth_conf.parent / REGISTRY).exists():
        return None
    return load(auth_conf.parent)


def with_userinfo(url: str, user: str, password: str) -> str:
    """``nats://host:port`` -> ``nats://user:password@host:port`` (unless it has one)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return url
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def client_url(user: User, servers: str) -> str:
    """Comma-separated server URLs with this user's credentials in each."""
    urls = [u.strip() for u in servers.split(",") if u.strip()]
    return ",".join(with_userinfo(u, user.name, user.password) for u in urls)
