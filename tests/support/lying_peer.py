"""A test double: ``twistd onionpeer`` whose uploads send wrong data.

``python tests/support/lying_peer.py -n [twistd options] onionpeer [peer options]``
runs twistd exactly as ``twistd`` would, after one patch: every upload
reads its file through a ``pread`` that flips the first byte of each chunk
it reads. Nothing else changes: the peer hashes its share honestly, so it
announces the true sha256 and passes the tracker's and its own checks; only
the bytes it sends are wrong, which only the requester's sha256 check can
catch. It logs ``lying sharer: flipped the first byte of chunk …`` once per
upload, so a test can tell that it did serve.

The patch goes through ``ChunkProducer.open``'s ``pread`` keyword (the
producer's documented way to read); if that is gone the wrapper exits with
an error at once instead of silently serving honest data.
"""

from __future__ import annotations

import inspect
import os
import sys


def _patch() -> None:
    from twisted.logger import Logger

    from onion_twisted.peer import upload_stream as sharing

    if "pread" not in inspect.signature(sharing.ChunkProducer).parameters:
        sys.exit("lying_peer: ChunkProducer takes no pread= any more; update tests/support/lying_peer.py")
    log = Logger(namespace="lying_peer")
    honest_open = sharing.ChunkProducer.open.__func__

    def lying_open(cls, path, chunk_size, chunks=None, **kwargs):
        read = kwargs.pop("pread", os.pread)
        told = []

        def pread(fd, length, offset):
            data = read(fd, length, offset)
            if not data:
                return data
            if not told:
                told.append(True)
                log.info("lying sharer: flipped the first byte of chunk {index} (and of every later one)",
                         index=offset // chunk_size)
            return bytes([data[0] ^ 0xFF]) + data[1:]

        return honest_open(cls, path, chunk_size, chunks, pread=pread, **kwargs)

    sharing.ChunkProducer.open = classmethod(lying_open)


if __name__ == "__main__":
    _patch()
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[1:]]
    run()
