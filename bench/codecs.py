"""Per-MiB cost of the codecs a cell crosses at every hop.

    python bench/codecs.py            # 9 repetitions of ~0.2 s per operation
    python bench/codecs.py --quick    # 3 repetitions of ~0.05 s

What is timed (one file_chunk-sized payload, 256 KiB of random bytes):

* base64 encode / decode of the payload: stdlib ``base64`` (decode with
  ``validate=True``, as wire.b64decode must refuse junk) vs ``pybase64``;
  "encode" makes bytes; "encode>str" makes the str a cell needs the way
  ``wire.b64encode`` does (``b64encode(x).decode("ascii")``); "enc_as_str" is
  pybase64's ``b64encode_as_string``, which makes the str in one step;
* JSON dumps / loads of a cell ``{"CID": uuid, "payload": base64(256 KiB)}``:
  stdlib ``json`` vs ``orjson`` (dumps to bytes in both cases, as a body is
  bytes on the wire);
* AES-128-GCM encrypt / decrypt of the payload (one onion layer, with AAD), via
  ``cryptography``'s AESGCM.

Each figure is the median over the repetitions of the mean time of one
operation, reported in ms per MiB of the bytes the operation handles (the raw
payload for base64 and AES, the JSON text for JSON) and in MiB/s. Writes
bench/out/codecs.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

import orjson
import pybase64
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MiB = 1024 * 1024
OUT = Path(__file__).resolve().parent / "out"


def machine() -> dict:
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "openssl": backend.openssl_version_text(),
        "cryptography": cryptography.__version__,
        "orjson": orjson.__version__,
        "pybase64": pybase64.__version__,
    }


def time_op(fn, target_s: float) -> float:
    """Mean seconds per call of ``fn``, over enough calls to last ~target_s."""
    fn()  # warm (allocations, lazy imports)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= target_s / 4 or n >= 1 << 20:
            break
        n *= 4
    calls = max(1, int(n * target_s / dt)) if dt > 0 else n
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 short repetitions (smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per operation (default 9, quick 3)")
    ap.add_argument("--size", type=int, default=256 * 1024, help="payload bytes (default 262144)")
    ap.add_argument("--out", default=str(OUT / "codecs.json"))
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 9)
    target = 0.05 if args.quick else 0.2

    raw = os.urandom(args.size)
    b64_bytes = base64.b64encode(raw)
    b64_text = b64_bytes.decode("ascii")
    cell = {"CID": str(uuid.uuid4()), "payload": b64_text}
    cell_json = orjson.dumps(cell)
    assert json.dumps(cell, separators=(",", ":")).encode() == cell_json
    aead = AESGCM(os.urandom(16))
    aad = b"onion-http/1 forward"
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, raw, aad)
    assert pybase64.b64decode(b64_text, validate=True) == raw == base64.b64decode(b64_text, validate=True)

    # (group, implementation, operation, function, bytes handled)
    cases = [
        ("base64", "stdlib base64", "encode", lambda: base64.b64encode(raw), len(raw)),
        ("base64", "pybase64", "encode", lambda: pybase64.b64encode(raw), len(raw)),
        # A cell needs a str: how it is made matters as much as the library (README, "Reading codecs").
        ("base64", "stdlib base64", "encode>str", lambda: base64.b64encode(raw).decode("ascii"), len(raw)),
        ("base64", "pybase64", "encode>str", lambda: pybase64.b64encode(raw).decode("ascii"), len(raw)),
        ("base64", "pybase64", "enc_as_str", lambda: pybase64.b64encode_as_string(raw), len(raw)),
        ("base64", "stdlib base64", "decode", lambda: base64.b64decode(b64_text, validate=True), len(raw)),
        ("base64", "pybase64", "decode", lambda: pybase64.b64decode(b64_text, validate=True), len(raw)),
        ("json", "stdlib json", "dumps", lambda: json.dumps(cell, separators=(",", ":")).encode("utf-8"), len(cell_json)),
        ("json", "orjson", "dumps", lambda: orjson.dumps(cell), len(cell_json)),
        ("json", "stdlib json", "loads", lambda: json.loads(cell_json), len(cell_json)),
        ("json", "orjson", "loads", lambda: orjson.loads(cell_json), len(cell_json)),
        ("aes", "AES-128-GCM", "encrypt", lambda: aead.encrypt(nonce, raw, aad), len(raw)),
        ("aes", "AES-128-GCM", "decrypt", lambda: aead.decrypt(nonce, sealed, aad), len(raw)),
    ]

    results = []
    for group, impl, op, fn, nbytes in cases:
        samples = [time_op(fn, target) for _ in range(reps)]
        per_op = statistics.median(samples)
        results.append({
            "group": group, "implementation": impl, "operation": op, "bytes": nbytes,
            "seconds_per_op_median": per_op, "seconds_per_op_samples": samples,
            "ms_per_mib": per_op * 1e3 * MiB / nbytes, "mib_per_s": nbytes / MiB / per_op,
        })
        print(f"  {impl:14} {op:10} {per_op * 1e6:10.1f} us/op", file=sys.stderr)

    # Speed-up of the chosen codec over the stdlib, per operation.
    by = {(r["implementation"], r["operation"]): r for r in results}
    speedups = {}
    pairs = [(("pybase64", "encode"), ("stdlib base64", "encode")),
             (("pybase64", "encode>str"), ("stdlib base64", "encode>str")),
             (("pybase64", "enc_as_str"), ("stdlib base64", "encode>str")),
             (("pybase64", "decode"), ("stdlib base64", "decode")),
             (("orjson", "dumps"), ("stdlib json", "dumps")),
             (("orjson", "loads"), ("stdlib json", "loads"))]
    for fast, slow in pairs:
        speedups[" ".join(fast)] = by[slow]["seconds_per_op_median"] / by[fast]["seconds_per_op_median"]

    print()
    print(f"Codecs on a {args.size // 1024} KiB payload (cell JSON {len(cell_json)} bytes), "
          f"median of {reps} repetitions")
    print()
    header = f"| {'implementation':14} | {'op':10} | {'us per op':>10} | {'ms per MiB':>10} | {'MiB/s':>8} | {'speed-up':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        key = f"{r['implementation']} {r['operation']}"
        sp = f"{speedups[key]:.1f}x" if key in speedups else ""
        print(f"| {r['implementation']:14} | {r['operation']:10} | {r['seconds_per_op_median'] * 1e6:10.1f} | "
              f"{r['ms_per_mib']:10.3f} | {r['mib_per_s']:8.0f} | {sp:>8} |")
    print()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "codecs", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
        "payload_bytes": args.size, "cell_json_bytes": len(cell_json), "repetitions": reps,
        "seconds_per_repetition": target, "results": results, "speedups": speedups,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
