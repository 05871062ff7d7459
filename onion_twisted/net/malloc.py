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

The trim threshold gives back only the top of the heap. Under load, with
many chunks of many circuits in flight at once, the buffers freed in the
middle of the heap stay resident: at size (``bench/scale.py``) a busy
node's resident memory was 110-146 MiB, and ``malloc_trim(0)`` (called from
gdb) brought it down to 72-80 MiB. ``HeapTrimmer``, run every
``TRIM_INTERVAL`` by each member, calls it while the heap holds more than
``TRIM_SLACK`` free bytes: a busy member gives its free pages back every
couple of seconds, an idle one never trims. (The free bytes stay counted
after a trim, their pages gone: glibc tells no resident free size.) Pages
given back are faulted in again when reused, once per trim rather than
once per buffer.

The slack rule waits up to ``TRIM_INTERVAL``, and a busy node can free
tens of MiB within that: at size its peak resident memory still reached
125-169 MiB (``bench/scale.py``, the soak). ``HeapTrimmer.cap``, run every
``CAP_INTERVAL``, reads the resident size (``/proc/self/statm``, a few
microseconds) and trims at once above ``RSS_CEILING``: the free pages go
back before they pile up, and a member in its usual range (an idle one
near 60 MiB, a busy one 70-90) never pays for the check more than a read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


MMAP_THRESHOLD = 8 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024
TRIM_SLACK = 24 * 1024 * 1024  # free heap bytes kept before a trim (the top's 16 MiB and some of the middle)
TRIM_INTERVAL = 2.0
RSS_CEILING = 100 * 1024 * 1024  # resident bytes above which free pages go back at once
CAP_INTERVAL = 0.25
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident size (Linux's /proc/self/statm), or None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def _glibc():
    # find_library runs ldconfig in a subprocess: once per process is enough.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_malloc(threshold: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds; False where there is no glibc."""
    mallopt = getattr(_glibc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    return mallopt(M_TRIM_THRESHOLD, trim) == 1 and ok


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapTrimmer:
    """Called every ``TRIM_INTERVAL``: gives the heap's free pages back once it holds more than ``slack``
    free bytes; ``cap``, called every ``CAP_INTERVAL``, gives them back whenever the resident size is
    above ``ceiling`` (glibc's ``mallinfo2`` and ``malloc_trim``; does nothing without them)."""

    def __init__(self, slack: int = TRIM_SLACK, ceiling: int = RSS_CEILING, libc=None, resident=resident_bytes):
        self.slack = slack
        self.ceiling = ceiling
        self.resident = resident
        libc = libc if libc is not None else _glibc()
        self._mallinfo2 = getattr(libc, "mallinfo2", None)
        self._malloc_trim = getattr(libc, "malloc_trim", None)
        if self._mallinfo2 is not None and self._malloc_trim is not None:
            self._mallinfo2.restype = _MallInfo2
            self._malloc_trim.argtypes = [ctypes.c_size_t]
        self.trims = 0
        self.cap_trims = 0  # of which ``cap``'s

    @property
    def can_trim(self) -> bool:
        """Whether this glibc has ``mallinfo2`` (2.33 and later) and ``malloc_trim``."""
        return self._mallinfo2 is not None and self._malloc_trim is not None

    def free_bytes(self) -> int | None:
        """Bytes the heap holds free (the top included), or None without glibc 2.33."""
        if not self.can_trim:
            return None
        return self._mallinfo2().fordblks

    def used_bytes(self) -> int | None:
        """Bytes allocated from the heap and by mmap (what is live), or None without glibc 2.33."""
        if not self.can_trim:
            return None
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def __call__(self) -> bool:
        free = self.free_bytes()
        if free is None or free <= self.slack:
            return False
        return self._trim()

    def cap(self) -> bool:
        if not self.can_trim:  # (not free_bytes(): mallinfo2 walks the heap's bins, four times a second here)
            return False
        resident = self.resident()
        if resident is None or resident <= self.ceiling:
            return False
        self.cap_trims += 1
        return self._trim()

    def _trim(self) -> bool:
        self._malloc_trim(0)
        self.trims += 1
        return True
