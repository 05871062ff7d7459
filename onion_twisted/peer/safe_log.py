"""Logging a peer's unexpected failures without naming its files (docs/protocol.md, safe logging)."""

from __future__ import annotations

from twisted.python.failure import Failure

from onion_twisted.protocol.errors import safe_os_error


def log_unexpected(log, what: str, failure: Failure, unsafe_logging: bool) -> None:
    # An OSError's text names its path (downloads/.partial/NAME.part, share/NAME), so
    # only its reason is logged; the traceback only with the debug switch.
    if unsafe_logging:
        log.failure(what, failure)
    else:
        log.error("{what}: {why}", what=what, why=safe_os_error(failure.value))
