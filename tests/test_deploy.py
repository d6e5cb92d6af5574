"""deploy/nats: every config passes `nats-server -t`; the Docker image and a 3-node cluster."""

from __future__ import annotations

import asyncio
import gc
import shutil
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cflow.creds import Registry, User, render_auth_conf
from cflow.server import binary

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "nats"
CONFIGS = sorted(DEPLOY.glob("*.conf"))

AUTH_HEADER = (
    '# Example accounts/users for swarm "default" (what `cfctl creds create` writes).\n'
    "# Regenerate for your swarms with `cfctl creds create AGENT --swarm S [--admin]`\n"
    "# and include the generated auth.conf instead; replace every CHANGE_ME.\n"
)


def example_auth_conf() -> str:
    reg = Registry(route_user="cflow-route", route_password="CHANGE_ME_ROUTE_PASSWORD", users=[
        User(name="default.admin", agent="admin", swarm="default",
             password="CHANGE_ME_ADMIN_PASSWORD", admin=True),
        User(name="default.worker1", agent="worker1", swarm="default",
             password="CHANGE_ME_WORKER1_PASSWORD", capabilities=["python"]),
    ])
    text = render_auth_conf(reg)
    return AUTH_HEADER + text[text.index("\n") + 1:]


def test_every_config_exists() -> None:
    names = {p.name for p in CONFIGS}
    assert {"single.conf", "cluster-node1.conf", "cluster-node2.conf", "cluster-node3.conf",
            "leaf.conf", "auth.conf"} <= names


@pytest.mark.parametrize("conf", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_passes_the_server_config_test(conf: Path, tmp_path: Path) -> None:
    res = subprocess.run([binary(), "--config", str(conf), "-t"], capture_output=True,
                         text=True, timeout=30, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "is valid" in res.stdout + res.stderr


def test_example_auth_conf_is_what_cfctl_creds_writes() -> None:
    """The documented permissions are the ones cflow issues (regenerate if this fails)."""
    assert (DEPLOY / "auth.conf").read_text() == example_auth_conf()


def test_cluster_nodes_differ_only_in_their_name() -> None:
    texts = [(DEPLOY / f"cluster-node{i}.conf").read_text() for i in (1, 2, 3)]
    normalised = {t.replace(f"node {i} of", "node N of").replace(f"cluster-node{i}.conf", "X")
                  .replace(f'server_name: "n{i}"', "NAME") for i, t in zip((1, 2, 3), texts,
                                                                          strict=True)}
    assert len(normalised) == 1
    for text in texts:
        assert 'include "auth.conf"' in text
        assert "authorization" in text  # route auth
        assert 'domain: "cflow"' in text


def test_image_is_built_from_scratch_with_the_wheels_binary() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "FROM scratch" in dockerfile
    assert "COPY nats-server /nats-server" in dockerfile
    compose = (DEPLOY / "docker-compose.yml").read_text()
    for i in (1, 2, 3):
        assert f'"/etc/nats/cluster-node{i}.conf"' in compose
    assert "pull_policy: never" in compose
    # FROM scratch only works for a statically linked binary.
    if sys.platform == "linux" and shutil.which("ldd"):
        res = subprocess.run(["ldd", binary()], capture_output=True, text=True, timeout=10)
        assert "not a dynamic executable" in res.stdout + res.stderr


# ------------------------------------------------------------------ docker


def _docker() -> Any:
    docker = pytest.importorskip("docker")
    client = None
    refused = None
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # any failure to reach the engine means "skip"
        refused = f"{type(exc).__name__}: {exc}"
        if client is not None:
            client.close()
    if refused is not None:
        # The SDK leaks the socket of a refused connection; collect it outside the
        # except block (its traceback holds it) with ResourceWarning silenced, or
        # the warning fails the run at exit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        pytest.skip(f"no Docker engine: {refused}")
    return client


@pytest.fixture(scope="module")
def nats_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    client = _docker()
    context = tmp_path_factory.mktemp("image")
    for item in DEPLOY.iterdir():
        if item.is_file():
            shutil.copy(item, context / item.name)
    shutil.copy(binary(), context / "nats-server")
    tag = f"cflow-nats-test:{uuid.uuid4().hex[:8]}"
    client.images.build(path=str(context), tag=tag, rm=True, pull=False)
    try:
        yield client, tag
    finally:
        client.images.remove(tag, force=True)


@pytest.mark.docker
@pytest.mark.integration
async def test_docker_three_node_cluster(nats_image: tuple[Any, str]) -> None:
    """The compose topology by hand: 3 containers from the scratch image, R3 streams."""
    from cflow.server import ensure_swarm_when_placeable, free_ports
    from cflow.status import stream_status
    from cflow.streams import connect, names

    client, tag = nats_image
    net = client.networks.create(f"cflow-test-{uuid.uuid4().hex[:8]}")
    containers = []
    ports = free_ports(3)
    try:
        for i in (1, 2, 3):
            containers.append(client.containers.run(
                tag, ["--config", f"/etc/nats/cluster-node{i}.conf"], detach=True,
                name=f"n{i}-{net.name}", hostname=f"n{i}", network=net.name,
                ports={"4222/tcp": ("127.0.0.1", ports[i - 1])},
            ))
        # Containers resolve each other as n1..n3 through their network aliases.
        for c, i in zip(containers, (1, 2, 3), strict=True):
            net.disconnect(c)
            net.connect(c, aliases=[f"n{i}"])
        url = ",".join(f"nats://default.admin:CHANGE_ME_ADMIN_PASSWORD@127.0.0.1:{p}"
                       for p in ports)
        nc = None
        async with asyncio.timeout(60):
            while nc is None:
                try:
                    nc = await connect(url)
                except ConnectionError:
                    await asyncio.sleep(0.5)  # containers start on their own schedule
            await ensure_swarm_when_placeable(nc, "default", 3, within_s=45)
            while True:
                st = await stream_status(nc, names.events_stream("default"))
                if st["health"] == "ok" and len(st["replicas"]) == 2:
                    break
                await asyncio.sleep(0.5)  # replicas catch up without telling clients
        await nc.close()
        assert st["num_replicas"] == 3
        assert {st["leader"], *(r["name"] for r in st["replicas"])} == {"n1", "n2", "n3"}
    finally:
        for c in containers:
            c.remove(force=True)
        net.remove()
