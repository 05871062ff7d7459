"""Peers' resident memory while a large file crosses the network.

Starts the demo's network (onion_twisted.ops.localnet) with bob sharing a file
of --mib MiB, has alice download it through her API, samples both peers'
resident memory (VmRSS) every 0.2 s and reads their peak (VmHWM) at the
end; also reports the transfer rate. Memory must not grow with file size:
run it with --mib 64 and --mib 1024 and compare.

    python bench/peer_memory.py --mib 1024
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

from common import peer_api as api, vm
from onion_twisted.ops.localnet import LocalNetwork


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="onion-mem-")
    base = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.10"
    net = LocalNetwork(run_dir, base=base, big_mib=args.mib, key_bits=1024)
    try:
        net.start(timeout=120)
        pids = {m.name: m.process.pid for m in net.members if m.role == "peer"}
        alice = net.address(net.peer_ips["alice"])
        name = f"big-{args.mib}MiB.bin"
        deadline = time.monotonic() + 60
        while not any(f["name"] == name for f in api(alice, "/api/status")["catalogue"]):
            if time.monotonic() > deadline:
                raise RuntimeError("alice never saw bob's file")
            time.sleep(0.2)
        idle = {n: vm(p, "VmRSS") for n, p in pids.items()}
        started = time.monotonic()
        api(alice, "/api/downloads", {"file": name})
        peak_rss = dict(idle)
        while True:
            for n, p in pids.items():
                peak_rss[n] = max(peak_rss[n], vm(p, "VmRSS"))
            state = next(d for d in api(alice, "/api/status")["downloads"] if d["file"] == name)
            if state["state"] in ("done", "failed"):
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        hwm = {n: vm(p, "VmHWM") for n, p in pids.items()}
        ok = state["state"] == "done"
        if ok:
            digest = hashlib.sha256()
            with open(Path(run_dir) / "alice" / "downloads" / name, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            ok = digest.hexdigest() == state["sha256"]
        mib = 1024 * 1024
        print(f"file {args.mib} MiB: {state['state']}, sha256 {'ok' if ok else 'WRONG'}, "
              f"{args.mib * mib / elapsed / 1e6:.1f} MB/s ({elapsed:.1f} s)")
        for n in pids:
            print(f"  {n:<6} idle {idle[n] / mib:6.1f} MiB  peak sampled {peak_rss[n] / mib:6.1f} MiB  "
                  f"VmHWM {hwm[n] / mib:6.1f} MiB")
        return 0 if ok else 1
    finally:
        net.stop()


if __name__ == "__main__":
    sys.exit(main())
