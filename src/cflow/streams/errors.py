"""Translate nats-py exceptions into cflow errors, by error code, in one place."""

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


def translate(exc: BaseException, *, subject: str = "", expected: int | None = None) -> CflowError:
    """Map one foreign exception to the cflow error tree."""
    if isinstance(exc, CflowError):
        return exc
    if isinstance(exc, nats.js.errors.NotFoundError):
        return NotFound("message", subject or "?")
    if isinstance(exc, nats.js.errors.APIError):
        code = exc.err_code
        if code == WRONG_LAST_SEQUENCE:
            return ConcurrencyConflict(subject, expected)
        if code in (STREAM_NOT_FOUND, NO_MESSAGE_FOUND, CONSUMER_NOT_FOUND):
            return NotFound("stream resource", subject or str(exc.description))
        if code in (MSG_TTL_INVALID, MSG_TTL_DISABLED, MESSAGE_TOO_LARGE):
            return InvalidInput(f"JetStream refused the write: {exc.description}")
        if isinstance(exc, nats.js.errors.ServiceUnavailableError):
            return Unavailable("JetStream is not available (is the server up with -js?)")
        return CflowError(f"JetStream error {exc.err_code or exc.code}: {exc.description}",
                          err_code=exc.err_code)
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
        return Unavailable(
            "no JetStream stream answered (run `cfctl init`, or is JetStream enabled?)"
        )
    if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
        return Unavailable("NATS request timed out")
    if isinstance(
        exc,
        nats.errors.NoServersError
        | nats.errors.ConnectionClosedError
        | nats.errors.StaleConnectionError
        | nats.errors.OutboundBufferLimitError
        | ConnectionError
        | OSError,
    ):
        return Unavailable(f"cannot reach NATS: {type(exc).__name__}")
    if isinstance(exc, nats.errors.Error):
        return Unavailable(f"NATS error: {type(exc).__name__}")
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
