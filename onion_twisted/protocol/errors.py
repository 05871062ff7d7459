"""The error answers of PROTOCOL.md §3, as exceptions.

Every failure the protocol core detects is one of these; the HTTP layer turns
it into its status and JSON body, so the status table lives in one place.
"""


class ProtocolError(Exception):
    status = 500
    error = "internal"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail

    def body(self) -> dict:
        return {"error": self.error, "detail": self.detail}


class BadRequest(ProtocolError):
    status = 400
    error = "bad_request"


class Forbidden(ProtocolError):
    status = 403
    error = "forbidden"


class UnknownCircuit(ProtocolError):
    status = 404
    error = "unknown_circuit"


class Conflict(ProtocolError):
    status = 409
    error = "conflict"


class TooLarge(ProtocolError):
    status = 413
    error = "too_large"


class RateLimited(ProtocolError):
    status = 429
    error = "rate_limited"


class NextHopFailed(ProtocolError):
    status = 502
    error = "next_hop_failed"
    answered: int | None = None  # the status the next hop answered, when it answered


class NextHopTimeout(ProtocolError):
    status = 504
    error = "next_hop_timeout"


class NextHopAbandoned(NextHopTimeout):
    """The exchange was cancelled by whoever awaited it, before its deadline:
    the answer was no longer wanted (a node whose previous hop went away
    cancels the forwarding it was doing for it). Handled as a timeout, so
    every clean-up runs as before; but nothing failed on the way, so it is
    not a failure to log."""


class Unavailable(ProtocolError):
    """Not in the §3 table: a GET for something this member does not have yet."""

    status = 503
    error = "unavailable"


def safe_os_error(error: BaseException) -> str:
    """What went wrong with a file, for a safe log line: the OSError's reason
    ("Permission denied"), never its text, which names the file's path."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__
