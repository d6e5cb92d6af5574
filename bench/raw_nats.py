"""Baselines under every cflow figure: the machine (fsync rate, loopback round
trip) and raw nats-py on the same server (core publish, JetStream publish and
publish_async, KV create/update, request/reply)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.stats import latency_summary

PAYLOAD = b"x" * 256


def fsync_rate(directory: Path, seconds: float) -> float:
    """Appends of 256 bytes, each followed by ``os.fsync``: operations per second."""
    path = directory / f"fsync-{uuid.uuid4().hex}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            os.write(fd, PAYLOAD)
            os.fsync(fd)
            n += 1
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def send_wake_cost(samples: int, idle_s: float = 0.0005) -> dict[str, float]:
    """Microseconds one ``send()`` of 300 B costs the sender: to a peer process busy
    reading (``busy_us``) and to one asleep in ``recv`` (``wake_us``).

    On a virtual machine, waking a process that sleeps on another vCPU is paid
    by the sender: every flush a client sends an idle nats-server, and every
    answer the server sends an idle client, pays it.
    """
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the peer process: read until closed
        try:
            conn, _ = srv.accept()
            while conn.recv(65536):
                pass
        finally:
            os._exit(0)
    srv.close()
    cli = socket.create_connection(("127.0.0.1", port))
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out: dict[str, float] = {}
    try:
        for name, gap in (("busy_us", 0.0), ("wake_us", idle_s)):
            spent = 0.0
            for _ in range(samples):
                t0 = time.perf_counter()
                cli.send(b"x" * 300)
                spent += time.perf_counter() - t0
                until = time.perf_counter() + gap
                while time.perf_counter() < until:  # stay on the CPU; the peer sleeps
                    pass
            out[name] = spent / samples * 1e6
    finally:
        cli.close()
        os.waitpid(pid, 0)
    return out


def loopback_rtt(samples: int) -> dict[str, float]:
    """One-byte ping-pong over a loopback TCP connection (TCP_NODELAY)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def echo() -> None:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(1)
                if not data:
                    return
                conn.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    cli = socket.create_connection(("127.0.0.1", port))
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    try:
        for _ in range(samples):
            t0 = time.perf_counter()
            cli.sendall(b"p")
            cli.recv(1)
            lat.append(time.perf_counter() - t0)
    finally:
        cli.close()
        thread.join(5)
        srv.close()
    return latency_summary(lat[10:] if len(lat) > 20 else lat)


async def _stream(js: Any, name: str, subjects: list[str]) -> None:
    from nats.js.api import StreamConfig

    await js.add_stream(StreamConfig(name=name, subjects=subjects, duplicate_window=120.0))


async def core_publish_rate(url: str, n: int) -> float:
    import nats

    nc = await nats.connect(url)
    try:
        sub = await nc.subscribe("bench.core.sink")  # a live interest, like a real consumer
        start = time.perf_counter()
        for _ in range(n):
            await nc.publish("bench.core.x", PAYLOAD)
        await nc.flush()
        rate = n / (time.perf_counter() - start)
        await sub.unsubscribe()
        return rate
    finally:
        await nc.close()


async def js_publish(url: str, n: int, n_async: int) -> dict[str, float]:
    """Awaited ``js.publish`` (rate, latency) and ``publish_async`` + one gather (rate)."""
    import nats

    nc = await nats.connect(url)
    name = f"BENCH_{uuid.uuid4().hex[:8]}"
    try:
        js = nc.jetstream(timeout=10.0)
        await _stream(js, name, [f"{name}.>"])
        lat = []
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            await js.publish(f"{name}.s.{i % 64}", PAYLOAD)
            lat.append(time.perf_counter() - t0)
        rate = n / (time.perf_counter() - start)
        start = time.perf_counter()
        futs = [await js.publish_async(f"{name}.a.{i % 64}", PAYLOAD) for i in range(n_async)]
        await asyncio.gather(*futs)
        rate_async = n_async / (time.perf_counter() - start)
        await js.delete_stream(name)
        return {"rate": rate, "p50": latency_summary(lat)["p50"], "async_rate": rate_async}
    finally:
        await nc.close()


async def kv_rates(url: str, n: int) -> dict[str, float]:
    """nats-py KV: ``create`` of new keys and compare-and-set ``update``, awaited one by one."""
    import nats
    from nats.js.api import KeyValueConfig

    nc = await nats.connect(url)
    bucket = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        js = nc.jetstream(timeout=10.0)
        kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1))
        revs = []
        start = time.perf_counter()
        for i in range(n):
            revs.append(await kv.create(f"k{i}", PAYLOAD))
        create_rate = n / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(n):
            await kv.update(f"k{i}", PAYLOAD, last=revs[i])
        update_rate = n / (time.perf_counter() - start)
        await js.delete_key_value(bucket)
        return {"create": create_rate, "update": update_rate}
    finally:
        await nc.close()


async def request_reply(url: str, n: int) -> dict[str, float]:
    """Round trip through the server to a responder on another connection."""
    import nats

    responder = await nats.connect(url)
    nc = await nats.connect(url)
    try:
        async def reply(msg: Any) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("bench.rr", cb=reply)
        await responder.flush()
        for _ in range(50):  # interest can reach the server after the flush under load
            try:
                await nc.request("bench.rr", b"p", timeout=1.0)
                break
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.05)
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            await nc.request("bench.rr", b"p", timeout=5.0)
            lat.append(time.perf_counter() - t0)
        return latency_summary(lat[10:] if n > 20 else lat)
    finally:
        await nc.close()
        await responder.close()
