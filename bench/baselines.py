"""Sections "machine" and "raw": the fsync rate, loopback round trip, and raw
nats-py on the same servers cflow's figures use."""

from __future__ import annotations

import asyncio

from bench import raw_nats
from bench.context import Ctx
from bench.servers import DURABILITY


async def machine(ctx: Ctx) -> None:
    reps = ctx.reps(3, 5)
    for _ in range(reps):
        rate = await asyncio.to_thread(raw_nats.fsync_rate, ctx.tmp, ctx.pick(0.3, 1.0))
        ctx.rec.add("machine.fsync.rate", rate, label="fsync rate (256 B append + fsync)",
                    unit="ops/s", section="0 machine", better="higher", is_baseline=True,
                    durability="fsync per write", note="same filesystem as the stores")
        rtt = await asyncio.to_thread(raw_nats.loopback_rtt, int(ctx.pick(500, 3000)))
        ctx.rec.add("machine.loopback.rtt_p50", rtt["p50"], label="loopback TCP round trip p50",
                    unit="ms", section="0 machine", is_baseline=True)
        wake = await asyncio.to_thread(raw_nats.send_wake_cost, int(ctx.pick(2000, 5000)))
        ctx.rec.add("machine.send.busy_us", wake["busy_us"],
                    label="send() to a busy peer process", unit="us", section="0 machine",
                    is_baseline=True, note="300 B over loopback TCP; the peer is reading")
        ctx.rec.add("machine.send.wake_us", wake["wake_us"],
                    label="send() that wakes an idle peer process", unit="us",
                    section="0 machine", baseline="machine.send.busy_us",
                    note="the sender pays the wake-up of a process asleep on another "
                         "vCPU: every flush to an idle server and every answer to an "
                         "idle client costs this")


async def raw(ctx: Ctx) -> None:
    reps = ctx.reps(2, 5)
    n = int(ctx.pick(300, 2000))
    n_async = int(ctx.pick(2000, 10000))
    url_default = ctx.servers.url("default")
    for _ in range(reps):
        rate = await raw_nats.core_publish_rate(url_default, int(ctx.pick(20000, 100000)))
        ctx.rec.add("raw.core_publish.rate", rate, label="core publish + flush (256 B)",
                    unit="msg/s", section="0 raw nats", better="higher", is_baseline=True,
                    note="no persistence")
        rr = await raw_nats.request_reply(url_default, int(ctx.pick(300, 2000)))
        ctx.rec.add("raw.request_reply.p50", rr["p50"], label="request/reply p50",
                    unit="ms", section="0 raw nats", baseline="machine.loopback.rtt_p50",
                    note="two connections through the server; no persistence")
        for sync in ("always", "default"):
            url = ctx.servers.url(sync)
            js = await raw_nats.js_publish(url, n, n_async)
            dur = DURABILITY[sync]
            ctx.rec.add(f"raw.{sync}.js_publish.rate", js["rate"],
                        label=f"JetStream publish, awaited, sync {sync}", unit="msg/s",
                        section="0 raw nats", better="higher", durability=dur,
                        baseline="machine.fsync.rate" if sync == "always" else None,
                        is_baseline=True)
            ctx.rec.add(f"raw.{sync}.js_publish.p50", js["p50"],
                        label=f"JetStream publish latency p50, sync {sync}", unit="ms",
                        section="0 raw nats", durability=dur, is_baseline=True)
            ctx.rec.add(f"raw.{sync}.js_publish_async.rate", js["async_rate"],
                        label=f"JetStream publish_async + gather, sync {sync}", unit="msg/s",
                        section="0 raw nats", better="higher", durability=dur,
                        is_baseline=True)
            kv = await raw_nats.kv_rates(url, n)
            ctx.rec.add(f"raw.{sync}.kv_create.rate", kv["create"],
                        label=f"KV create (new key), awaited, sync {sync}", unit="ops/s",
                        section="0 raw nats", better="higher", durability=dur,
                        is_baseline=True)
            ctx.rec.add(f"raw.{sync}.kv_update.rate", kv["update"],
                        label=f"KV update (compare-and-set), awaited, sync {sync}", unit="ops/s",
                        section="0 raw nats", better="higher", durability=dur,
                        is_baseline=True)
