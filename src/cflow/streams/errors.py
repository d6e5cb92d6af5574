"""Translate nats-py exceptions into cflow errors, by error code, in one place.

An ``Unavailable`` made here carries ``reason``: what the server or the client
said, so a caller can tell a retry signal from a failure without reading text.

=================  ==========================================================
reason             meaning
=================  ==========================================================
``no-leader``      the stream (or the JetStream meta group) has no leader yet
``not-leader``     the answering server is not the leader (leadership moved)
``in-process``     a write with this Msg-Id is being stored (our earlier try)
``not-ready``      the leader cannot check an expected sequence just now
``no-responders``  nothing listens: no stream leader subscribed, or no stream
``timeout``        no answer in time (the write may or may not have landed)
``disconnected``   the connection to NATS is down or closing
=================  ==========================================================

Every one of them is worth retrying for a bounded time; after a timeout or an
in-process answer the write's outcome is unknown until it is read back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import nats.errors
import nats.js.errors

from cflow.errors import CflowError, ConcurrencyConflict, InvalidInput, NotFound, Unavailable

# JetStream API error codes (nats-server/server/errors.json)
WRONG_LAST_SEQUENCE = 10071
STREAM_NOT_FOUND = 10059
NO_MESSAGE_FOUND = 10037
STREAM_NAME_IN_USE = 10058
CONSUMER_NOT_FOUND = 10014
MSG_TTL_INVALID = 10165
MSG_TTL_DISABLED = 10166
MESSAGE_TOO_LARGE = 10054
CLUSTER_NOT_AVAILABLE = 10008  # "JetStream system temporarily unavailable": no leader
CLUSTER_NOT_LEADER = 10009
WRONG_LAST_SEQUENCE_CONSTANT = 10164  # another write on the subject is in flight
DUPLICATE_IN_PROCESS = 10158  # "duplicate message id is in process"
EXPECTED_SEQ_NOT_READY = 10163  # "expected last sequence per subject temporarily unavailable"

RETRY_REASONS = frozenset({"no-leader", "not-leader", "in-process", "not-ready",
                           "no-responders", "timeout", "disconnected"})


def retryable(exc: BaseException) -> bool:
    """Whether ``exc`` (a translated error) is worth retrying: the cluster may recover."""
    return isinstance(exc, Unavailable) and getattr(exc, "reason", None) in RETRY_REASONS


def translate(exc: BaseException, *, subject: str = "", expected: int | None = None) -> CflowError:
    """Map one foreign exception to the cflow error tree."""
    if isinstance(exc, CflowError):
        return exc
    if isinstance(exc, nats.js.errors.NotFoundError) and exc.err_code != STREAM_NOT_FOUND:
        return NotFound("message", subject or "?")
    if isinstance(exc, nats.js.errors.APIError):
        code = exc.err_code
        where = f" ({subject})" if subject else ""
        if code in (WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_CONSTANT):
            return ConcurrencyConflict(subject, expected)
        if code == STREAM_NOT_FOUND:
            return NotFound("stream", f"{subject or exc.description} (run `cfctl init`)")
        if code in (NO_MESSAGE_FOUND, CONSUMER_NOT_FOUND):
            return NotFound("stream resource", subject or str(exc.description))
        if code in (MSG_TTL_INVALID, MSG_TTL_DISABLED, MESSAGE_TOO_LARGE):
            return InvalidInput(f"JetStream refused the write: {exc.description}")
        if code == CLUSTER_NOT_AVAILABLE:
            return Unavailable(f"no JetStream leader{where} (election in progress?)",
                               reason="no-leader", err_code=code)
        if code == CLUSTER_NOT_LEADER:
            return Unavailable(f"JetStream leadership moved{where}", reason="not-leader",
                               err_code=code)
        if code == DUPLICATE_IN_PROCESS:
            return Unavailable(f"a write with this Msg-Id is still being stored{where}",
                               reason="in-process", err_code=code)
        if code == EXPECTED_SEQ_NOT_READY:
            return Unavailable(f"the stream leader is not ready to check sequences{where}",
                               reason="not-ready", err_code=code)
        if isinstance(exc, nats.js.errors.ServiceUnavailableError):
            return Unavailable("JetStream is not available (is the server up with -js?)",
                               reason="no-responders")
        return CflowError(f"JetStream error {exc.err_code or exc.code}: {exc.description}",
                          err_code=exc.err_code)
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
        what = f" for {subject}" if subject else ""
        return Unavailable(f"no JetStream responder{what} (stream missing or without a leader)",
                           reason="no-responders")
    if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
        return Unavailable("NATS request timed out", reason="timeout")
    if isinstance(
        exc,
        nats.errors.NoServersError
        | nats.errors.ConnectionClosedError
        | nats.errors.StaleConnectionError
        | nats.errors.OutboundBufferLimitError
        | ConnectionError
        | OSError,
    ):
        return Unavailable(f"cannot reach NATS: {type(exc).__name__}", reason="disconnected")
    if isinstance(exc, nats.errors.Error):
        return Unavailable(f"NATS error: {type(exc).__name__}", reason="disconnected")
    raise exc


@contextmanager
def nats_errors(subject: str = "", expected: int | None = None) -> Iterator[None]:
    """Re-raise any NATS exception inside the block as a cflow error."""
    try:
        yield
    except CflowError:
        raise
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        raise translate(exc, subject=subject, expected=expected) from exc
