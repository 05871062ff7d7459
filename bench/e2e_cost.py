"""What §13 adds per MiB of a transfer, in CPU: the sharer's sealing, the requester's
opening and checking against the leaf row, and the sharer's one-time hashing.

Each figure is the median of ``--runs`` passes over ``--mib`` MiB in chunks of
``--chunk`` bytes, timed with the process's CPU clock, beside a baseline taken in
the same process: one /2 hop layer (``onion2.HopKeys`` seal and open) over the
same bytes, the unit every relayed MiB already pays at each hop. Prints one
JSON object (``--out`` writes it too).

    python bench/e2e_cost.py [--mib 64] [--chunk 1048576] [--runs 7]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import common

from onion_twisted.protocol import e2e, merkle, onion2


def timed(work, runs: int, mib: int) -> float:
    """Median CPU milliseconds per MiB of ``work()``."""
    samples = []
    for _ in range(runs):
        start = time.process_time()
        work()
        samples.append((time.process_time() - start) * 1000 / mib)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1 << 20)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not merkle.is_e2e_chunk_size(args.chunk):
        parser.error("--chunk must be 256 KiB times a power of two, up to 4 MiB")

    data = os.urandom(args.mib << 20)
    view = memoryview(data)
    chunks = [view[i:i + args.chunk] for i in range(0, len(data), args.chunk)]
    hasher = merkle.FileHasher()
    hasher.update(data)
    _, leaves = hasher.finish()
    requester = e2e.new_private()
    transfer = "3f0c2a6e-5d0b-4f4e-9a57-1f1d9c1a2b3c"
    _, sharer_cipher = e2e.sharer_side(e2e.public_bytes(requester), transfer)
    sealed = [sharer_cipher.seal_chunk(i, c) for i, c in enumerate(chunks)]
    hop = (os.urandom(16), os.urandom(16), os.urandom(12), os.urandom(12))

    def hop_layer():  # the baseline: one /2 layer sealed and opened, as each hop does
        keys = onion2.HopKeys(*hop)  # fresh counters and replay windows each pass
        for c in chunks:
            keys.open_forward(keys.seal_forward(c))

    def seal():  # the sharer, per chunk: AES-GCM under the transfer key (its message is §8's work)
        for i, c in enumerate(chunks):
            sharer_cipher.seal_chunk(i, c)

    def open_and_check():  # the requester, per chunk: the tag, then the leaves
        for i, s in enumerate(sealed):
            plain = sharer_cipher.open_chunk(i, s)
            if not merkle.chunk_matches(plain, i, args.chunk, leaves):
                raise AssertionError("a chunk did not match its leaves")

    def hash_for_sharing():  # once per shared file: sha256 and the leaf row in one pass
        h = merkle.FileHasher()
        for c in chunks:
            h.update(c)
        h.finish()

    def sha256_only():  # what sharing cost before §13
        h = hashlib.sha256()
        for c in chunks:
            h.update(c)
        h.hexdigest()

    figures = {name: timed(work, args.runs, args.mib) for name, work in (
        ("hop_layer", hop_layer), ("sharer_seal", seal), ("requester_open_and_check", open_and_check),
        ("share_hash_sha256_and_leaves", hash_for_sharing), ("share_hash_sha256_only", sha256_only))}
    per_transfer = figures["sharer_seal"] + figures["requester_open_and_check"]
    report = {
        "bench": "e2e_cost", "machine": common.machine(openssl=True),
        "mib": args.mib, "chunk_size": args.chunk, "runs": args.runs,
        "cpu_ms_per_mib": figures,
        "transfer_added_ms_per_mib": per_transfer,
        "transfer_added_vs_hop_layer": per_transfer / figures["hop_layer"],
        "sharing_hash_vs_sha256_only": (figures["share_hash_sha256_and_leaves"]
                                        / figures["share_hash_sha256_only"]),
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
