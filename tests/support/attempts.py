"""What an ``Attempt``'s slots ask of their download, for tests that script the rest:
``TransferLedger`` keeps the transfers under way as ``Download`` does (``new_transfer``,
``release``); a test's download subclasses it and adds what its case needs."""

from __future__ import annotations

from onion_twisted.peer.transfer import Transfer


class TransferLedger:
    def __init__(self):
        self.transfers: list[Transfer] = []

    def new_transfer(self, claimed):
        t = Transfer(claimed)
        self.transfers.append(t)
        return t

    def release(self, t):
        self.transfers.remove(t)
