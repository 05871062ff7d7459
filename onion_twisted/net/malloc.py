"""glibc malloc settings for processes that move large chunks.

Every hop makes several short-lived buffers of one to two MiB per chunk
(the received body, the decoded layer, the plaintext, the new layer, the
cell sent on). glibc's defaults serve such buffers with mmap and raise the
mmap threshold dynamically after the first is freed; the result is either
a fresh mapping per buffer, zeroed and faulted in page by page, or a heap
that fragments and keeps growing.

Measured on a 512 MiB transfer (bench/network.py): with a fixed 128 KiB
threshold, page faults were about half of every hop's CPU (~23 ms per MiB
and hop); with large buffers on the heap (threshold 8 MiB) and up to
16 MiB of free heap kept instead of given back (trim threshold), a hop
costs ~5 ms per MiB and a node's resident memory stays near 80 MiB, flat
in the file's size. The fixed values keep glibc from adapting them.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


MMAP_THRESHOLD = 8 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024


def tune_malloc(threshold: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    return mallopt(M_TRIM_THRESHOLD, trim) == 1 and ok
