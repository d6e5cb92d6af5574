"""Shared memory: pure parts, KV + events, CAS, TTL, history, BM25 search, 16 writer processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cflow import events as ev
from cflow.errors import InvalidInput, NotFound
from cflow.memory import (
    MemoryConflict,
    MemoryEntry,
    MemoryRecord,
    bm25_search,
    build_memory_put,
    key_token,
    search_entries,
    snippet,
    token_parts,
)
from cflow.streams import names
from cflow.swarm import Swarm

# ------------------------------------------------------------------------- pure


@given(st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s),
       st.text(min_size=1, max_size=60))
def test_key_token_is_a_subject_token_and_round_trips(namespace: str, key: str) -> None:
    token = key_token(namespace, key)
    assert ev.check_token(token, "token") == token
    assert len(token) <= 128
    if token.startswith("k"):
        assert token_parts(token) == (namespace, key)


def test_long_keys_are_hashed_but_still_tokens() -> None:
    token = key_token("ns", "x" * 500)
    assert token.startswith("h")
    assert len(token) == 65
    assert token_parts(token) is None
    assert key_token("ns", "x" * 500) == token


def test_empty_key_refused() -> None:
    with pytest.raises(InvalidInput, match="non-empty"):
        key_token("ns", "")


def test_put_builder_sets_ttl_and_rollup_only_with_ttl() -> None:
    rec = MemoryRecord(namespace="n", key="k", value="v", ttl_s=1.5)
    out = build_memory_put("cf_s_memory", "kbg", rec, expected_revision=7)
    assert out.subject == "$KV.cf_s_memory.kbg"
    assert out.headers == {"Nats-Expected-Last-Subject-Sequence": "7", "Nats-TTL": "2s",
                           "Nats-Rollup": "sub"}
    plain = build_memory_put("cf_s_memory", "kbg", MemoryRecord(namespace="n", key="k", value="v"),
                             expected_revision=None)
    assert plain.headers == {}


def test_snippet_marks_terms_around_first_hit() -> None:
    text = "alpha " * 40 + "the needle is here " + "omega " * 40
    out = snippet(text, ["needle"], width=60)
    assert "[needle]" in out
    assert out.startswith("…")
    assert out.endswith("…")


def _entry(ns: str, key: str, value: str, tags: tuple[str, ...] = ()) -> MemoryEntry:
    return MemoryEntry(namespace=ns, key=key, value=value, content_type="text", tags=tags,
                       version=1, author="t", updated_ms=0)


CORPUS = [
    _entry("docs", "auth", "login uses oauth tokens; tokens refresh every hour"),
    _entry("docs", "db", "postgres connection pool settings and timeouts"),
    _entry("docs", "deploy", "deploy with docker compose; tokens live in vault"),
    _entry("notes", "auth-bug", "oauth callback fails when the token expired", ("bug", "oauth")),
    _entry("notes", "misc", "lunch order: pizza"),
]


def test_bm25_ranking_exact_order() -> None:
    hits = search_entries(CORPUS, "oauth tokens")
    assert [(h.namespace, h.key) for h in hits] == [
        ("docs", "auth"),  # both terms, "tokens" twice
        ("notes", "auth-bug"),  # "oauth" twice (value + tag) but not "tokens"
        ("docs", "deploy"),  # "tokens" once
    ]
    assert hits[0].score > hits[1].score > hits[2].score > 0
    assert "[oauth]" in hits[0].snippet


def test_bm25_filters_namespace_and_tag_and_limit() -> None:
    assert [h.key for h in search_entries(CORPUS, "oauth tokens", namespace="docs")] == [
        "auth", "deploy"]
    assert [h.key for h in search_entries(CORPUS, "oauth", tag="bug")] == ["auth-bug"]
    assert [h.key for h in search_entries(CORPUS, "oauth tokens", limit=1)] == ["auth"]
    assert search_entries(CORPUS, "kubernetes") == []
    assert search_entries(CORPUS, "  ;; ") == []
    assert search_entries([], "oauth") == []


def test_bm25_matches_hand_computed_scores() -> None:
    import math

    docs = [_entry("n", "a", "cat cat dog"), _entry("n", "b", "dog bird"),
            _entry("n", "c", "fish")]
    hits = search_entries(docs, "cat")
    # key terms count too: a -> [a, cat, cat, dog] (4), b -> [b, dog, bird] (3), c -> 2
    n, df, avgdl, tf, dl = 3, 1, (4 + 3 + 2) / 3, 2, 4
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    expected = idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * dl / avgdl))
    assert [h.key for h in hits] == ["a"]
    assert hits[0].score == pytest.approx(expected)


def test_bm25_on_projection_shaped_table_skips_deleted_and_expired() -> None:
    from datetime import datetime

    conn = duckdb.connect()
    conn.execute("CREATE TABLE memory (namespace VARCHAR, key VARCHAR, value VARCHAR, "
                 "tags VARCHAR[], version BIGINT, deleted BOOLEAN, expires_at TIMESTAMP, "
                 "updated_by VARCHAR)")
    conn.execute("INSERT INTO memory VALUES "
                 "('n', 'live', 'apple', [], 1, false, NULL, 'x'), "
                 "('n', 'gone', 'apple', [], 2, true, NULL, 'x'), "
                 "('n', 'old', 'apple', [], 3, false, TIMESTAMP '2000-01-01', 'x')")
    hits = bm25_search(conn, "apple", now=datetime(2020, 1, 1))
    assert [h.key for h in hits] == ["live"]
    with pytest.raises(InvalidInput, match="table name"):
        bm25_search(conn, "apple", table="memory; drop table memory")


# ------------------------------------------------------------------ integration


SWARM_AGENT = "alice"  # the conftest `swarm` fixture acts as this agent


@pytest.mark.integration
async def test_put_get_delete_list_with_events(swarm: Swarm) -> None:
    mem = swarm.memory
    e1 = await mem.put("proj", "build cmd", "make all", tags=["build", "ci"])
    assert e1.version > 0
    assert e1.author == "alice"
    got = await mem.get("proj", "build cmd")
    assert (got.value, got.tags, got.version) == ("make all", ("build", "ci"), e1.version)
    e2 = await mem.put("proj", "config", {"b": 1, "a": [1, 2]})
    assert e2.content_type == "json"
    assert (await mem.get("proj", "config")).json_value == {"a": [1, 2], "b": 1}
    await mem.put("other", "x", "y")
    assert [(e.namespace, e.key) for e in await mem.list()] == [
        ("other", "x"), ("proj", "build cmd"), ("proj", "config")]
    assert [e.key for e in await mem.list(namespace="proj")] == ["build cmd", "config"]
    assert [e.key for e in await mem.list(tag="ci")] == ["build cmd"]
    await mem.delete("proj", "build cmd")
    with pytest.raises(NotFound):
        await mem.get("proj", "build cmd")
    with pytest.raises(NotFound):
        await mem.delete("proj", "build cmd")
    token = key_token("proj", "build cmd")
    types = [s.event.type for s in await swarm.log.entity_events("memory", token)]
    assert types == ["MemoryStored", "MemoryDeleted"]
    history = await mem.history("proj", "build cmd")
    assert [(h.operation, h.value) for h in history] == [("put", "make all"), ("delete", None)]


@pytest.mark.integration
async def test_compare_and_set_on_version(swarm: Swarm) -> None:
    mem = swarm.memory
    first = await mem.put("n", "k", "v1", expected_version=0)
    with pytest.raises(MemoryConflict) as info:
        await mem.put("n", "k", "again", expected_version=0)
    assert info.value.actual == first.version
    second = await mem.put("n", "k", "v2", expected_version=first.version)
    with pytest.raises(MemoryConflict):
        await mem.put("n", "k", "stale", expected_version=first.version)
    with pytest.raises(MemoryConflict):
        await mem.delete("n", "k", expected_version=first.version)
    await mem.delete("n", "k", expected_version=second.version)
    # After a delete, "create only" works again.
    third = await mem.put("n", "k", "v3", expected_version=0)
    assert (await mem.get("n", "k")).version == third.version
    # compare-and-set and a TTL (which rolls older revisions up) together
    fourth = await mem.put("n", "k", "v4", ttl_s=60, expected_version=third.version)
    with pytest.raises(MemoryConflict):
        await mem.put("n", "k", "v5", ttl_s=60, expected_version=third.version)
    assert (await mem.get("n", "k")).value == "v4"
    assert (await mem.get("n", "k")).expires_ms == fourth.updated_ms + 60_000


@pytest.mark.integration
async def test_concurrent_cas_exactly_one_wins(swarm: Swarm) -> None:
    base = await swarm.memory.put("n", "counter", "0")
    results = await asyncio.gather(
        *(swarm.memory.put("n", "counter", str(i), expected_version=base.version)
          for i in range(8)), return_exceptions=True)
    wins = [r for r in results if isinstance(r, MemoryEntry)]
    assert len(wins) == 1
    assert all(isinstance(r, MemoryConflict) for r in results if r not in wins)


@pytest.mark.integration
async def test_ttl_expiry_on_the_server_clock(swarm: Swarm) -> None:
    mem = swarm.memory
    await mem.put("n", "keep", "old value without ttl")
    await mem.put("n", "keep", "short lived", ttl_s=1)
    await mem.put("n", "plain", "stays")
    # Await the server's expiry marker on the key's subject (no sleep-and-check).
    bucket = swarm.log.bucket(names.MEMORY)
    subject = names.kv_subject(bucket, key_token("n", "keep"))
    marker = asyncio.get_running_loop().create_future()

    async def on_msg(msg: object) -> None:
        headers = getattr(msg, "headers", None) or {}
        if "Nats-Marker-Reason" in headers and not marker.done():
            marker.set_result(headers["Nats-Marker-Reason"])

    sub = await swarm.log.js.subscribe(subject, cb=on_msg, stream=names.kv_stream(bucket),
                                       ordered_consumer=True)
    try:
        assert await asyncio.wait_for(marker, 10) == "MaxAge"
    finally:
        await sub.unsubscribe()
    with pytest.raises(NotFound):
        await mem.get("n", "keep")  # the older revision was rolled up, not resurrected
    assert [e.key for e in await mem.list(namespace="n")] == ["plain"]
    # A "create only" put after expiry expects the marker and succeeds.
    await mem.put("n", "keep", "new", expected_version=0)


@pytest.mark.integration
async def test_search_through_the_facade(swarm: Swarm) -> None:
    for e in CORPUS:
        await swarm.memory.put(e.namespace, e.key, e.value, tags=e.tags)
    hits = await swarm.memory.search("oauth tokens")
    assert [(h.namespace, h.key) for h in hits] == [
        ("docs", "auth"), ("notes", "auth-bug"), ("docs", "deploy")]
    assert [h.key for h in await swarm.memory.search("oauth", tag="bug")] == ["auth-bug"]


WRITER = """
import asyncio, json, sys
from cflow.swarm import Swarm

async def main(url, swarm, writer, n):
    acked = []
    async with Swarm.connect(url, swarm=swarm, agent=f"w{writer}") as s:
        for i in range(n):
            e = await s.memory.put("load", f"w{writer}-{i}", f"value {writer} {i}",
                                   tags=[f"w{writer}"])
            acked.append([e.key, e.version])
            # every writer also hammers one shared key
            if i % 10 == 0:
                await s.memory.put("load", "shared", f"{writer}-{i}")
    print(json.dumps(acked))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


@pytest.mark.integration
async def test_sixteen_writer_processes(nats_url: str, swarm_name: str) -> None:
    writers, per = 16, 100
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="checker") as s:
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, nats_url, swarm_name,
                                   str(w), str(per)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for w in range(writers)]
        outputs = []
        try:
            for p in procs:
                out, err = await asyncio.to_thread(p.communicate, timeout=240)
                assert p.returncode == 0, err
                outputs.append(out)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        acked = {key: version for out in outputs for key, version in json.loads(out)}
        assert len(acked) == writers * per
        entries = {e.key: e for e in await s.memory.list(namespace="load")}
        for key, version in acked.items():
            assert entries[key].version == version
            w, i = key[1:].split("-")
            assert entries[key].value == f"value {w} {i}"
        # The shared key's history has every write of every writer (160), beyond
        # the bucket's 64 revisions: it comes from the event stream.
        history = await s.memory.history("load", "shared")
        assert len(history) == writers * (per // 10)
        assert len({h.version for h in history}) == len(history)
        stored = await s.log.read(names.events_filter(swarm_name, "memory"))
        assert len(stored) == writers * per + writers * (per // 10)


@pytest.mark.integration
def test_cli_memory_commands(cli_env: dict[str, str]) -> None:
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "cfctl")

    def cf(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], env=cli_env, capture_output=True, text=True,
                              timeout=60, check=False)

    assert cf("memory", "set", "api url", "https://x.test/v1", "-t", "config").returncode == 0
    assert cf("memory", "set", "notes", "the api is flaky on mondays").returncode == 0
    assert cf("memory", "get", "api url").stdout.strip() == "https://x.test/v1"
    assert cf("memory", "set", "api url", "https://x.test/v2", "--if-version", "0"
              ).returncode == 1  # exists: compare-and-set refused
    hits = json.loads(cf("--json", "memory", "search", "api", "--limit", "5").stdout)
    assert {h["key"] for h in hits} == {"api url", "notes"}
    listed = json.loads(cf("--json", "memory", "list", "--tag", "config").stdout)
    assert [e["key"] for e in listed] == ["api url"]
    assert cf("memory", "delete", "api url").returncode == 0
    missing = cf("memory", "get", "api url")
    assert missing.returncode == 5
    assert missing.stderr.startswith("error: memory entry not found")
    history = json.loads(cf("--json", "memory", "history", "api url").stdout)
    assert [h["operation"] for h in history] == ["put", "delete"]


@pytest.mark.integration
async def test_search_through_the_projection_matches_local(swarm: Swarm, tmp_path: object
                                                           ) -> None:
    from pathlib import Path

    from cflow.errors import Unavailable
    from cflow.projections.projector import Projector
    from cflow.projections.query import QueryService

    for e in CORPUS:
        await swarm.memory.put(e.namespace, e.key, e.value, tags=e.tags)
    await swarm.memory.put("notes", "tmp", "oauth oauth oauth tokens", ttl_s=60)
    await swarm.memory.delete("notes", "tmp")
    with pytest.raises(Unavailable):
        await swarm.memory.search("oauth", source="projection")
    projector = Projector(swarm.log, Path(str(tmp_path)) / "p.duckdb")
    service = QueryService(swarm.nc, swarm.name, projector, server_id="p1")
    await service.start()
    task = asyncio.create_task(projector.run())
    try:
        remote = await swarm.memory.search("oauth tokens", source="projection")
        local = await swarm.memory.search("oauth tokens", source="kv")
        assert [(h.namespace, h.key) for h in remote] == [
            ("docs", "auth"), ("notes", "auth-bug"), ("docs", "deploy")]
        assert [(h.key, round(h.score, 9), h.snippet, h.tags) for h in remote] == [
            (h.key, round(h.score, 9), h.snippet, h.tags) for h in local]
        # read-your-writes through the projection
        await swarm.memory.put("docs", "sso", "oauth tokens oauth tokens via sso")
        assert (await swarm.memory.search("oauth tokens", limit=1))[0].key == "sso"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await service.stop()
        await projector.close()
