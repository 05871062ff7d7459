"""Counters for a member's status page and ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from collections import Counter


class RateWindow:
    """Events per second over the last ``span`` seconds, in one-second buckets."""

    def __init__(self, clock, span: int = 10):
        self.clock = clock
        self.span = span
        self._buckets: dict[int, int] = {}

    def add(self, n: int = 1) -> None:
        second = int(self.clock.seconds())
        self._buckets[second] = self._buckets.get(second, 0) + n
        if len(self._buckets) > self.span + 1:
            for old in [s for s in self._buckets if s <= second - self.span]:
                del self._buckets[old]

    def per_second(self) -> float:
        now = int(self.clock.seconds())
        return sum(n for s, n in self._buckets.items() if now - self.span < s <= now) / self.span


class PrometheusText:
    """The text exposition format, one metric family at a time."""

    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples) -> None:
        """``samples``: a value, or ``(label, label value, value)`` triples."""
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        if isinstance(samples, list):
            self.lines += [f'{name}{{{label}="{key}"}} {value}' for label, key, value in samples]
        else:
            self.lines.append(f"{name} {samples}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class MemberMetrics:
    """What every member counts: uptime and error answers by status."""

    def __init__(self, clock):
        self.clock = clock
        self.started = clock.seconds()
        self.errors = Counter()       # status -> count

    def error(self, status: int) -> None:
        self.errors[status] += 1

    async def counting_errors(self, coroutine):
        """Await ``coroutine``, counting the ProtocolError it raises by status."""
        from onion_twisted.protocol.errors import ProtocolError

        try:
            return await coroutine
        except ProtocolError as e:
            self.error(e.status)
            raise

    def uptime(self) -> float:
        return self.clock.seconds() - self.started

    def _errors_family(self, out: PrometheusText, prefix: str) -> None:
        out.family(f"{prefix}_errors_total", "counter", "Error answers, by HTTP status.",
                   [("status", status, self.errors[status]) for status in sorted(self.errors)])


class NodeMetrics(MemberMetrics):
    def __init__(self, clock):
        super().__init__(clock)
        self.cells = Counter()        # direction -> cells
        self.bytes = Counter()        # direction -> bytes
        self.creates_total = 0
        self.creates = RateWindow(clock)
        self.extends_failed_total = 0
        self.neighbour_left_total = 0  # circuits closed because a neighbour left the directory

    def relayed(self, direction: str, nbytes: int) -> None:
        self.cells[direction] += 1
        self.bytes[direction] += nbytes

    def created(self) -> None:
        self.creates_total += 1
        self.creates.add()

    def extend_failed(self) -> None:
        self.extends_failed_total += 1

    def neighbour_left(self, circuits: int) -> None:
        self.neighbour_left_total += circuits

    def prometheus(self, circuits: int, bridges: int, queue=None) -> str:
        """``queue``: the node's CellScheduler (bulk cells waiting for a turn), or None."""
        out = PrometheusText()
        directions = ("forward", "backward")
        out.family("onion_node_circuits", "gauge", "Open circuits through this node.", circuits)
        out.family("onion_node_bridges", "gauge", "Open bridge ends at this node.", bridges)
        if queue is not None:
            out.family("onion_node_queued_cells", "gauge", "Bulk cells waiting for their turn.", len(queue))
            out.family("onion_node_queued_bytes", "gauge", "Bytes of the bulk cells waiting.", queue.queued_bytes)
            out.family("onion_node_queued_bytes_peak", "gauge", "Most bytes ever waiting at once.",
                       queue.peak_queued_bytes)
        out.family("onion_node_cells_total", "counter", "Cells relayed, by direction.",
                   [("direction", d, self.cells[d]) for d in directions])
        out.family("onion_node_bytes_total", "counter", "Payload bytes relayed, by direction.",
                   [("direction", d, self.bytes[d]) for d in directions])
        self._errors_family(out, "onion_node")
        out.family("onion_node_creates_total", "counter", "Circuits created here.", self.creates_total)
        out.family("onion_node_creates_per_second", "gauge", "Circuits created per second over the last 10 s.",
                   f"{self.creates.per_second():.3f}")
        out.family("onion_node_extends_failed_total", "counter",
                   "Extends that failed (each closed its circuit).", self.extends_failed_total)
        out.family("onion_node_neighbour_left_total", "counter",
                   "Circuits closed because a neighbouring node left the directory.", self.neighbour_left_total)
        out.family("onion_node_uptime_seconds", "gauge", "Seconds since the node started.", f"{self.uptime():.0f}")
        return out.text()


class TrackerMetrics(MemberMetrics):
    """What the tracker counts: never an address, a CID or a file name."""

    MESSAGE_TYPES = ("ls", "list", "request", "check", "file_chunk", "transfer_end")
    # The error names the tracker answers a message with (catalogue.MessageError); a
    # fixed set, so a hostile exit cannot grow the metrics with names of its own.
    REFUSALS = ("not_found", "no_source", "busy", "source_failed", "too_many_files", "no_bridge", "bad_request")

    def __init__(self, clock):
        super().__init__(clock)
        self.messages = Counter()   # message type (known types only) -> count
        self.requests = Counter()   # outcome -> count
        self.refusals = Counter()   # error name (known names only) -> count
        self.checks = Counter()     # a source check's answer (reachable, gone, unknown) -> count

    def message(self, kind) -> None:
        self.messages[kind if kind in self.MESSAGE_TYPES else "other"] += 1

    def request(self, outcome: str) -> None:
        self.requests[outcome] += 1

    def checked(self, state: str) -> None:
        self.checks[state] += 1

    def refused(self, reason) -> None:
        """A message answered ``{"type": "error", "error": reason}``."""
        self.refusals[reason if reason in self.REFUSALS else "other"] += 1

    def prometheus(self, *, nodes: int, circuits: int, entries: int, transfers: int) -> str:
        out = PrometheusText()
        out.family("onion_tracker_nodes", "gauge", "Nodes in the directory.", nodes)
        out.family("onion_tracker_circuits", "gauge", "Circuits known to the tracker.", circuits)
        out.family("onion_tracker_catalogue_entries", "gauge", "Distinct (name, sha256) entries.", entries)
        out.family("onion_tracker_transfers", "gauge",
                   "Transfers under way, estimated: bridged ones not yet past their size at 1 MiB/s plus "
                   "60 s (the tracker never sees a transfer end).", transfers)
        out.family("onion_tracker_messages_total", "counter", "Messages from circuits, by type.",
                   [("type", kind, self.messages[kind]) for kind in (*self.MESSAGE_TYPES, "other")])
        out.family("onion_tracker_requests_total", "counter", "File requests, by outcome.",
                   [("outcome", o, self.requests[o]) for o in ("bridged", "failed")])
        out.family("onion_tracker_checks_total", "counter",
                   "Source checks (does a transfer's source circuit still reach its sharer?), by answer.",
                   [("source", s, self.checks[s]) for s in ("reachable", "gone", "unknown")])
        out.family("onion_tracker_refused_total", "counter",
                   "Messages from circuits answered with an error, by reason (a refused request: "
                   "not_found, no_source, busy ...).",
                   [("reason", r, self.refusals[r]) for r in (*self.REFUSALS, "other")])
        self._errors_family(out, "onion_tracker")
        out.family("onion_tracker_uptime_seconds", "gauge", "Seconds since the tracker started.",
                   f"{self.uptime():.0f}")
        return out.text()
