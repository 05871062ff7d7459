"""The choice of a source for a request (docs/protocol.md 11.4, 17.13; 17.10, choices 26, 27, 37-39).

The tracker knows a circuit only as (exit IP, CID), so the fairest measure of
how widely a file is shared that it has is the number of distinct exits its
sources come through: a sharer that opens many circuits through one exit
counts once, and through many exits it pays a circuit per exit.
"""

from __future__ import annotations

from onion_twisted.protocol.messages import FileRequest, MessageError

EXCLUDED = "every other source of that file was excluded"
AVOIDED = "every other source of that file is already serving this download"


def choose_source(catalogue, request: FileRequest, requester_key, is_sealed) -> tuple:
    """(entry key, usable source keys, end to end) for ``request``, or MessageError.

    The candidate entries are the name's that match the request's sha256 and
    root. An entry's usable sources are its circuits but the requester's own,
    those it excluded and those it avoids. With a key from a sealed circuit an
    entry with a root and sealed sources ranks first, and only those sources
    are used (§13). Then the entry whose usable sources come through the most
    distinct exits wins, then the one with the most of them; ties at random.
    """
    candidates = [k for k in catalogue.names.get(request.file, ())
                  if (request.sha256 is None or k[1] == request.sha256)
                  and (request.root is None or k[2] == request.root)]
    transfers = catalogue.transfers
    excluded = transfers.source_keys(request.exclude)
    avoided = transfers.source_keys(request.avoid)
    # End to end only between two sealed circuits: the requester's key must cross
    # no exit in the clear, on its way in or out.
    wants_e2e = request.key is not None and is_sealed(requester_key)
    best_rank, best = None, []
    for key in candidates:
        sources = [k for k in catalogue.entries.get(key, ())
                   if k != requester_key and k not in excluded and k not in avoided]
        if not sources:
            continue
        sealed = [k for k in sources if is_sealed(k)] if wants_e2e and key[2] is not None else []
        usable = sealed or sources
        rank = (len(sealed) > 0, len({k[0] for k in usable}), len(usable))
        if best_rank is None or rank > best_rank:
            best_rank, best = rank, [(key, usable, bool(sealed))]
        elif rank == best_rank:
            best.append((key, usable, bool(sealed)))
    if not best:
        raise _why_none(catalogue, candidates, requester_key, excluded)
    if len(best) == 1:
        return best[0]
    # Sorted first so that a seeded rng draws the same whatever the sets' order.
    best.sort(key=lambda b: (b[0][0], b[0][1] or "", b[0][2] or ""))
    return catalogue.rng.choice(best)


def _why_none(catalogue, candidates, requester_key, excluded) -> MessageError:
    others = [k for c in candidates for k in catalogue.entries.get(c, ()) if k != requester_key]
    if others:
        # Only the avoided stand between this request and a source: the download has them all.
        return MessageError("no_source", EXCLUDED if all(k in excluded for k in others) else AVOIDED)
    if any(catalogue.entries.get(k) for k in candidates):
        return MessageError("no_source", "only the requester's own circuit shares that file")
    return MessageError("not_found", "no circuit shares that file")


def least_loaded(catalogue, sources: list):
    """The source whose exit has the fewest transfers under way, then the fewest of its
    own, ties at random: load spreads over exits, so over sharers behind different exits."""
    transfers = catalogue.transfers
    exit_load = {ip: transfers.of_exit(ip) for ip in {k[0] for k in sources}}
    load = {k: (exit_load[k[0]], transfers.of_circuit(catalogue.circuits[k])) for k in sources}
    least = min(load.values())
    return catalogue.rng.choice([k for k in sources if load[k] == least])
