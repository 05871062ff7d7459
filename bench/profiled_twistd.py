"""twistd under cProfile, with the stats written even when twistd stops on a signal.

    python bench/profiled_twistd.py OUT.prof -n --pidfile= onionnode [options]

``python -m cProfile -o OUT twistd ...`` writes nothing when the node is
stopped with SIGTERM: twistd re-raises the signal on its way out
(``twisted.application.app._exitWithSignal``), so the process dies before
cProfile dumps. Here the dump happens first. Used by ``bench/relay.py --profile``.
"""

from __future__ import annotations

import cProfile
import sys


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["twistd"] + sys.argv[2:]
    from twisted.application import app
    from twisted.scripts.twistd import run

    profile = cProfile.Profile()
    exit_with_signal = app._exitWithSignal
    dumped = False

    def dump():
        nonlocal dumped
        if not dumped:
            profile.disable()
            profile.dump_stats(out)
            dumped = True

    def dump_then_exit(sig):
        dump()
        exit_with_signal(sig)

    app._exitWithSignal = dump_then_exit
    profile.enable()
    try:
        run()
    finally:
        dump()


if __name__ == "__main__":
    main()
