"""glibc malloc settings for processes that move large chunks.

Every hop makes several short-lived buffers of 300–500 KiB per chunk
(base64 text, JSON, AES layers). glibc raises its mmap threshold
dynamically after the first such buffer is freed, so later ones come from
the heap, which fragments and is seldom given back: a sharer's resident
memory grew with the file it served (bench/peer_memory.py: 415 MiB for
1 GiB). A fixed mmap threshold of 128 KiB keeps every large buffer in its
own mapping, returned to the kernel when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap and trim thresholds; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    return mallopt(M_TRIM_THRESHOLD, threshold) == 1 and ok
