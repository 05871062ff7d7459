"""Peers' resident memory while a large file crosses the network.

Starts the demo's network (onion_twisted.localnet) with bob sharing a file
of --mib MiB, has alice download it through her API, samples both peers'
resident memory (VmRSS) every 0.2 s and reads their peak (VmHWM) at the
end; also reports the transfer rate. Memory must not grow with file size:
run it with --mib 64 and --mib 1024 and compare.

    python bench/peer_memory.py --mib 1024
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from onion_twisted.localnet import LocalNetwork


def vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def api(url: str, body: dict | None = None, host: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", "Host": host})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read())


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
        while not any(f["name"] == name for f in api(f"http://{alice}/api/status", host=alice)["catalogue"]):
            if time.monotonic() > deadline:
                raise RuntimeError("alice never saw bob's file")
            time.sleep(0.2)
        idle = {n: vm(p, "VmRSS") for n, p in pids.items()}
        started = time.monotonic()
        api(f"http://{alice}/api/downloads", {"file": name}, host=alice)
        peak_rss = dict(idle)
        while True:
            for n, p in pids.items():
                peak_rss[n] = max(peak_rss[n], vm(p, "VmRSS"))
            state = next(d for d in api(f"http://{alice}/api/status", host=alice)["downloads"] if d["file"] == name)
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
