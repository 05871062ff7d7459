"""What a member pays to take in a fresh copy of the directory (PROTOCOL.md §6).

    python bench/directory_parse.py            # 9 repetitions
    python bench/directory_parse.py --quick    # 3 repetitions

Nodes register and fetch the directory every period (``register_interval``),
peers whenever they build; the tracker issues a new copy at least every
heartbeat, so nearly every copy a member fetches differs from its last one by
``issued`` alone. Timed, for directories of 60, 200 and 1000 /2 nodes (RSA 2048
identity keys, an onion key each), one ``parse_signed_directory`` of:

* ``first``: a copy with nothing known before it (every key and address parsed:
  what every copy cost before docs choice 71);
* ``again``: the next copy, re-issued with the same entries, given the earlier
  copy as ``known`` (entries reused; the signature is checked all the same);
* ``one_new``: the same with one entry changed (a node's new onion key).

Each figure is the median over the repetitions of the mean time of one parse,
in ms. Writes bench/directory-parse.json (``--quick``: bench/out/directory-parse-quick.json).
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import time
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onion_twisted.protocol import crypto, wire  # noqa: E402
from onion_twisted.protocol.directory import parse_signed_directory  # noqa: E402

TRACKER = ed25519.Ed25519PrivateKey.generate()
SIZES = (60, 200, 1000)


def signed_copy(entries, issued):
    body = orjson.dumps({"issued": issued, "nodes": entries})
    return body, crypto.sign_body(TRACKER, body)


def first_parse(copy):
    wire._literal_host.cache_clear()  # the addresses' IPs, remembered across copies
    return parse_signed_directory(*copy, TRACKER.public_key(), 5000)


def mean_ms(parse, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while True:
        parse()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps, seconds = (3, 0.05) if args.quick else (9, 0.2)
    # Keys are made once and listed again: a parse costs the same for any key.
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(20)]
    public = [(crypto.public_key_pem(k), crypto.fingerprint(k)) for k in keys]
    results = {}
    for size in SIZES:
        entries = [{"address": f"10.{i // 250}.{i % 250}.1:5000", "public_key": public[i % 20][0],
                    "fingerprint": public[i % 20][1], "onion_key": base64.b64encode(os.urandom(32)).decode()}
                   for i in range(size)]
        first = signed_copy(entries, 1_700_000_000)
        again = signed_copy(entries, 1_700_000_005)
        changed = [dict(e) for e in entries]
        changed[0]["onion_key"] = base64.b64encode(os.urandom(32)).decode()
        one_new = signed_copy(changed, 1_700_000_010)
        known = parse_signed_directory(*first, TRACKER.public_key(), 5000)
        cases = {
            "first": lambda: first_parse(first),
            "again": lambda: parse_signed_directory(*again, TRACKER.public_key(), 5000, known=known),
            "one_new": lambda: parse_signed_directory(*one_new, TRACKER.public_key(), 5000, known=known),
        }
        row = {name: statistics.median(mean_ms(parse, seconds) for _ in range(reps)) for name, parse in cases.items()}
        row["body_kib"] = round(len(first[0]) / 1024, 1)
        results[str(size)] = {k: round(v, 3) for k, v in row.items()}
        print(f"{size:5d} nodes ({row['body_kib']} KiB): first {row['first']:.2f} ms, "
              f"again {row['again']:.2f} ms ({row['first'] / row['again']:.1f}x less), "
              f"one entry new {row['one_new']:.2f} ms")
    here = Path(__file__).resolve().parent
    out = here / "out" / "directory-parse-quick.json" if args.quick else here / "directory-parse.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(orjson.dumps({"bench": "directory_parse", "reps": reps, "results": results},
                                option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
