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


class NodeMetrics:
    def __init__(self, clock):
        self.clock = clock
        self.started = clock.seconds()
        self.cells = Counter()        # direction -> cells
        self.bytes = Counter()        # direction -> bytes
        self.errors = Counter()       # status -> count
        self.creates_total = 0
        self.creates = RateWindow(clock)

    def relayed(self, direction: str, nbytes: int) -> None:
        self.cells[direction] += 1
        self.bytes[direction] += nbytes

    def created(self) -> None:
        self.creates_total += 1
        self.creates.add()

    def error(self, status: int) -> None:
        self.errors[status] += 1

    def uptime(self) -> float:
        return self.clock.seconds() - self.started

    def prometheus(self, circuits: int, bridges: int) -> str:
        lines = [
            "# HELP onion_node_circuits Open circuits through this node.",
            "# TYPE onion_node_circuits gauge",
            f"onion_node_circuits {circuits}",
            "# HELP onion_node_bridges Open bridge ends at this node.",
            "# TYPE onion_node_bridges gauge",
            f"onion_node_bridges {bridges}",
            "# HELP onion_node_cells_total Cells relayed, by direction.",
            "# TYPE onion_node_cells_total counter",
        ]
        for d in ("forward", "backward"):
            lines.append(f'onion_node_cells_total{{direction="{d}"}} {self.cells[d]}')
        lines += ["# HELP onion_node_bytes_total Payload bytes relayed, by direction.",
                  "# TYPE onion_node_bytes_total counter"]
        for d in ("forward", "backward"):
            lines.append(f'onion_node_bytes_total{{direction="{d}"}} {self.bytes[d]}')
        lines += ["# HELP onion_node_errors_total Error answers, by HTTP status.",
                  "# TYPE onion_node_errors_total counter"]
        for status in sorted(self.errors):
            lines.append(f'onion_node_errors_total{{status="{status}"}} {self.errors[status]}')
        lines += [
            "# HELP onion_node_creates_total Circuits created here.",
            "# TYPE onion_node_creates_total counter",
            f"onion_node_creates_total {self.creates_total}",
            "# HELP onion_node_creates_per_second Circuits created per second over the last 10 s.",
            "# TYPE onion_node_creates_per_second gauge",
            f"onion_node_creates_per_second {self.creates.per_second():.3f}",
            "# HELP onion_node_uptime_seconds Seconds since the node started.",
            "# TYPE onion_node_uptime_seconds gauge",
            f"onion_node_uptime_seconds {self.uptime():.0f}",
        ]
        return "\n".join(lines) + "\n"


class TrackerMetrics:
    """What the tracker counts: never an address, a CID or a file name."""

    MESSAGE_TYPES = ("ls", "list", "request", "file_chunk", "transfer_end")

    def __init__(self, clock):
        self.clock = clock
        self.started = clock.seconds()
        self.messages = Counter()   # message type (known types only) -> count
        self.requests = Counter()   # outcome -> count
        self.errors = Counter()     # status -> count

    def message(self, kind) -> None:
        self.messages[kind if kind in self.MESSAGE_TYPES else "other"] += 1

    def request(self, outcome: str) -> None:
        self.requests[outcome] += 1

    def error(self, status: int) -> None:
        self.errors[status] += 1

    def uptime(self) -> float:
        return self.clock.seconds() - self.started

    def prometheus(self, *, nodes: int, circuits: int, entries: int, transfers: int) -> str:
        lines = []

        def gauge(name, help_text, value):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"])

        gauge("onion_tracker_nodes", "Nodes in the directory.", nodes)
        gauge("onion_tracker_circuits", "Circuits known to the tracker.", circuits)
        gauge("onion_tracker_catalogue_entries", "Distinct (name, sha256) entries.", entries)
        gauge("onion_tracker_transfers", "Transfers under way (estimated).", transfers)
        lines += ["# HELP onion_tracker_messages_total Messages from circuits, by type.",
                  "# TYPE onion_tracker_messages_total counter"]
        for kind in (*self.MESSAGE_TYPES, "other"):
            lines.append(f'onion_tracker_messages_total{{type="{kind}"}} {self.messages[kind]}')
        lines += ["# HELP onion_tracker_requests_total File requests, by outcome.",
                  "# TYPE onion_tracker_requests_total counter"]
        for outcome in ("bridged", "failed"):
            lines.append(f'onion_tracker_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
        lines += ["# HELP onion_tracker_errors_total Error answers, by HTTP status.",
                  "# TYPE onion_tracker_errors_total counter"]
        for status in sorted(self.errors):
            lines.append(f'onion_tracker_errors_total{{status="{status}"}} {self.errors[status]}')
        gauge("onion_tracker_uptime_seconds", "Seconds since the tracker started.", f"{self.uptime():.0f}")
        return "\n".join(lines) + "\n"
