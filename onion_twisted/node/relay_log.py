"""How a node says a relay failed (PROTOCOL.md §3): safe by default, at most a line a second per kind."""

from __future__ import annotations

import contextlib

from onion_twisted.protocol.errors import NextHopAbandoned, ProtocolError


class RelayFailureLog:
    """A mixin of ``NodeRelay``: uses its ``log``, ``clock``, ``unsafe_logging`` and ``_failures_logged``."""

    # --- relay failures in the log -----------------------------------------------------

    @contextlib.contextmanager
    def _logging_failure(self, what: str, circuit, neighbour=None):
        """Log a ProtocolError raised inside (a next hop that failed) and let it go on."""
        try:
            yield
        except ProtocolError as e:
            self._relay_failed(what, e, circuit, neighbour)
            raise

    def _relay_failed(self, what: str, error: ProtocolError, circuit, neighbour=None) -> None:
        """Say what failed on the way, so a broken transfer is never silent.

        Safe form: what failed and the error's detail (details never name an
        address); the circuit id and the neighbour only with unsafe_logging.
        At most one line a second per kind of failure, with the count of the
        others, so a neighbour that fails every cell cannot flood the log.
        """
        if isinstance(error, NextHopAbandoned):
            return  # nothing failed: whoever the cell was relayed for went away and cancelled it
        logged = self._failures_logged
        now = self.clock.seconds()
        last = logged.get(what)
        if last is not None and now - last[0] < 1.0:
            last[1] += 1
            return
        more = f" ({last[1]} more since the last such line)" if last is not None and last[1] else ""
        logged[what] = [now, 0]
        if self.unsafe_logging:
            self.log.warn("{what}: {why}{more} (circuit {cid}, neighbour {neighbour})", what=what, why=error.detail,
                          more=more, cid=circuit.in_cid, neighbour=str(neighbour or circuit.out_addr))
        else:
            self.log.warn("{what}: {why}{more}", what=what, why=error.detail, more=more)

    def _debug(self, fmt: str, **kw) -> None:
        # Safe logging: circuit ids, addresses and names only with the debug switch.
        if self.unsafe_logging:
            self.log.debug(fmt, **kw)

