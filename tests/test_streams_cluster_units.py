"""Pure pieces of cluster behaviour: error codes, retry budget, raw gets, status lines."""

from __future__ import annotations

import asyncio
import base64
import time

import nats.errors
import nats.js.errors
import pytest

from cflow.errors import ConcurrencyConflict, NotFound, Unavailable
from cflow.status import replica_health, replication_summary
from cflow.streams.client import Attempts, iso_ms, parse_headers, raw_from_leader
from cflow.streams.errors import (
    CLUSTER_NOT_AVAILABLE,
    DUPLICATE_IN_PROCESS,
    EXPECTED_SEQ_NOT_READY,
    STREAM_NOT_FOUND,
    WRONG_LAST_SEQUENCE_CONSTANT,
    retryable,
    translate,
)


def api_error(err_code: int, code: int = 500) -> nats.js.errors.APIError:
    return nats.js.errors.APIError(code=code, err_code=err_code, description="desc")


@pytest.mark.parametrize(("err_code", "reason"), [
    (CLUSTER_NOT_AVAILABLE, "no-leader"),
    (DUPLICATE_IN_PROCESS, "in-process"),
    (EXPECTED_SEQ_NOT_READY, "not-ready"),
])
def test_election_codes_are_retryable_unavailable(err_code: int, reason: str) -> None:
    err = translate(api_error(err_code), subject="CF_s_EVENTS")
    assert isinstance(err, Unavailable)
    assert err.reason == reason
    assert retryable(err)
    assert "cfctl init" not in str(err)


def test_duplicate_in_process_is_not_a_failure_text() -> None:
    err = translate(api_error(DUPLICATE_IN_PROCESS, 409))
    assert "being stored" in str(err)


def test_no_responders_and_timeouts_are_retryable_and_do_not_blame_init() -> None:
    for exc in (nats.errors.NoRespondersError(), nats.errors.TimeoutError(), TimeoutError(),
                nats.errors.ConnectionClosedError()):
        err = translate(exc, subject="cf.s.evt.task.t")
        assert isinstance(err, Unavailable)
        assert retryable(err)
        assert "cfctl init" not in str(err)


def test_a_missing_stream_keeps_the_init_hint_and_is_not_retried() -> None:
    for exc in (api_error(STREAM_NOT_FOUND, 404),
                nats.js.errors.NotFoundError(code=404, err_code=STREAM_NOT_FOUND,
                                             description="stream not found")):
        err = translate(exc, subject="CF_s_EVENTS")
        assert isinstance(err, NotFound)
        assert "cfctl init" in str(err)
        assert not retryable(err)


def test_wrong_last_sequence_constant_is_a_conflict() -> None:
    assert isinstance(translate(api_error(WRONG_LAST_SEQUENCE_CONSTANT, 400)),
                      ConcurrencyConflict)


async def test_attempts_are_bounded_with_backoff() -> None:
    attempts = Attempts(0.3, 5.0)
    assert attempts.timeout() <= 0.3
    started = time.monotonic()
    pauses = 0
    while await attempts.pause():
        pauses += 1
    assert 0.25 < time.monotonic() - started < 1.0
    assert 2 <= pauses < 10
    assert attempts.timeout() == 0.25  # a last try still gets a moment
    none = Attempts(0.0, 5.0)
    assert not await none.pause()
    await asyncio.sleep(0)


def test_iso_ms_reads_the_servers_nanosecond_timestamps() -> None:
    assert iso_ms("1970-01-01T00:00:01.999999999Z") == 1999
    assert iso_ms("2026-12-02T06:05:09.261928948Z") == 1796191509261
    assert iso_ms("2026-12-02T06:05:09Z") == 1796191509000
    assert iso_ms("2026-12-02T07:05:09.5+01:00") == 1796191509500


def test_a_leader_get_reply_decodes_headers_data_and_time() -> None:
    hdrs = base64.b64encode(b"NATS/1.0\r\nNats-Msg-Id: m1\r\nKV-Operation: DEL\r\n\r\n")
    raw = raw_from_leader({"subject": "s", "seq": 7, "hdrs": hdrs.decode(),
                           "data": base64.b64encode(b"{}").decode(),
                           "time": "2026-12-02T06:05:09.261928948Z"})
    assert (raw.seq, raw.subject, raw.data) == (7, "s", b"{}")
    assert raw.headers == {"Nats-Msg-Id": "m1", "KV-Operation": "DEL"}
    assert raw.time_ms == 1796191509261
    assert parse_headers(b"NATS/1.0\r\n\r\n") == {}


def test_replication_summary_names_leader_lag_and_elections() -> None:
    ok = {"leader": "n0", "replicas": [
        {"name": "n1", "current": True, "offline": False, "lag": 0},
        {"name": "n2", "current": False, "offline": False, "lag": 12}]}
    assert replication_summary(replica_health(ok, 3), 3) == (
        "R3 leader n0; n1 current, n2 lag 12 catching up")
    leaderless = {"replicas": [{"name": "n1", "current": False, "offline": True, "lag": 0}]}
    line = replication_summary(replica_health(leaderless, 3), 3)
    assert line == "R3 election in progress (no leader); n1 offline"
    assert replication_summary(replica_health(None, 1), 1) == "R1"
