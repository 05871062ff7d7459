"""Where the machine's CPU went, by kind of work, from ``perf record -a -e cpu-clock`` files.

    python bench/perf_split.py FILE [FILE ...]        # a table; --json for the figures

``bench/network.py --perf PREFIX`` writes one such file per onion bulk run
(``PREFIX-v2-1.data``, ...): every process on the machine, sampled by the
kernel's software clock, so a sample is taken only while a process is on a
core. (py-spy and cProfile's default clock count wall time: a process
waiting for one of two cores shows where it was preempted, not where its
CPU went.) Python 3.11 has no perf trampolines, so the interpreter is one
line; what it calls (OpenSSL's AES-GCM, libc's copies, the kernel's TCP,
base64) are each their own. Needs Linux ``perf`` (Debian's ``linux-perf``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

#: (kind, test on (dso, symbol, kernel?)) in order: the first that matches counts.
KINDS = [
    ("idle", lambda dso, sym, kernel: "safe_halt" in sym or "cpuidle" in sym or sym.startswith("default_idle")),
    ("AES-GCM (TLS records and onion layers)", lambda dso, sym, kernel: "aesni" in sym or "ghash" in sym
     or "gcm" in sym.lower()),
    ("copies (memcpy, memmove)", lambda dso, sym, kernel: not kernel and ("memmove" in sym or "memcpy" in sym)),
    ("zeroing (memset)", lambda dso, sym, kernel: not kernel and "memset" in sym),
    ("Python interpreter", lambda dso, sym, kernel: "libpython" in dso or dso.startswith("python")),
    ("kernel (TCP, syscalls, scheduling, page faults)", lambda dso, sym, kernel: kernel),
    ("base64", lambda dso, sym, kernel: "base64" in dso),
    ("malloc, free (libc)", lambda dso, sym, kernel: dso.startswith("libc") and re.search(
        r"malloc|free|_int_|unlink_chunk|realloc", sym) is not None),
    ("OpenSSL, other", lambda dso, sym, kernel: "rust" in dso or "crypto" in dso or "ssl" in dso),
    ("cffi", lambda dso, sym, kernel: "cffi" in dso),
]
LINE = re.compile(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)")


def split(path: str) -> dict:
    """Per kind, the share of all samples in ``path`` (percent), and the sample count."""
    out = subprocess.run(["perf", "report", "-i", path, "--stdio", "--no-children", "--sort", "dso,sym",
                          "-g", "none"], capture_output=True, text=True, check=True).stdout
    count = re.search(r"# Samples: ([\d.]+)([KM]?)", out)
    samples = round(float(count.group(1)) * {"": 1, "K": 1e3, "M": 1e6}[count.group(2)]) if count else 0
    shares = {kind: 0.0 for kind, _ in KINDS}
    shares["other"] = 0.0
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        share, dso, where, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
        kind = next((k for k, test in KINDS if test(dso, sym, where == "k")), "other")
        shares[kind] += share
    return {"samples": samples, "percent": shares}


def combine(splits: list[dict]) -> dict:
    """Shares over several files, each weighted by its samples; and the same of the busy time."""
    total = sum(s["samples"] for s in splits) or 1
    kinds = splits[0]["percent"].keys()
    percent = {k: sum(s["percent"][k] * s["samples"] for s in splits) / total for k in kinds}
    busy = 100.0 - percent["idle"]
    return {"files": len(splits), "samples": total, "percent": {k: round(v, 2) for k, v in percent.items()},
            "percent_of_busy": {k: round(100.0 * v / busy, 2) for k, v in percent.items() if k != "idle" and busy > 0}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = combine([split(f) for f in args.files])
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"| kind of work ({result['files']} file(s)) | share of the cores' time | share of the busy time |")
    print("|---|---:|---:|")
    for kind, share in sorted(result["percent"].items(), key=lambda kv: -kv[1]):
        busy = result["percent_of_busy"].get(kind)
        print(f"| {kind} | {share:.1f} % | {'' if busy is None else f'{busy:.1f} %'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
