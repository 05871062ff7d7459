"""net.results.SharedResult: one running piece of work, its result shared by many callers.

The work is a Deferred the test holds and fires; nothing sleeps.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.net.results import SharedResult


class Work:
    """A ``start`` that counts its calls and hands back a Deferred the test fires."""

    def __init__(self):
        self.started: list[tuple] = []
        self.running: list[defer.Deferred] = []

    def __call__(self, *args, **kwargs):
        self.started.append((args, kwargs))
        d = defer.Deferred()
        self.running.append(d)
        return d


class SharedResultTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.work = Work()
        self.shared = SharedResult(self.work)

    def test_concurrent_callers_start_the_work_once_and_all_get_its_result(self):
        first, second, third = self.shared.get(), self.shared.get(), self.shared.get()
        self.assertEqual(len(self.work.started), 1)
        self.assertTrue(self.shared.running)
        for d in (first, second, third):
            self.assertNoResult(d)
        self.work.running[0].callback("listing")
        self.assertEqual([self.successResultOf(d) for d in (first, second, third)], ["listing"] * 3)
        self.assertFalse(self.shared.running)

    def test_a_failure_reaches_every_caller(self):
        first, second = self.shared.get(), self.shared.get()
        self.work.running[0].errback(ValueError("disk gone"))
        for d in (first, second):
            self.assertEqual(str(self.failureResultOf(d, ValueError).value), "disk gone")
        self.assertFalse(self.shared.running)

    def test_a_start_that_raises_fails_its_caller(self):
        def broken():
            raise RuntimeError("cannot start")

        shared = SharedResult(broken)
        self.failureResultOf(shared.get(), RuntimeError)
        self.assertFalse(shared.running)

    def test_a_call_after_the_work_ended_starts_it_again(self):
        first = self.shared.get()
        self.work.running[0].callback(1)
        self.assertEqual(self.successResultOf(first), 1)
        second = self.shared.get()
        self.assertEqual(len(self.work.started), 2)
        self.assertNoResult(second)
        self.work.running[1].callback(2)
        self.assertEqual(self.successResultOf(second), 2)

    def test_a_call_after_a_failure_starts_it_again(self):
        self.shared.get().addErrback(lambda _: None)
        self.work.running[0].errback(ValueError("once"))
        again = self.shared.get()
        self.assertEqual(len(self.work.started), 2)
        self.work.running[1].callback("fine")
        self.assertEqual(self.successResultOf(again), "fine")

    def test_a_caller_starting_again_from_its_callback_starts_new_work(self):
        later = []
        first = self.shared.get()
        first.addCallback(lambda _: later.append(self.shared.get()))
        self.work.running[0].callback("old")
        self.assertEqual(len(self.work.started), 2)
        self.assertNoResult(later[0])  # not the old result: new work runs for it

    def test_each_caller_has_its_own_deferred(self):
        first, second = self.shared.get(), self.shared.get()
        self.assertIsNot(first, second)
        first.addCallback(lambda result: result + ["changed by the first caller"])
        self.work.running[0].callback(["result"])
        self.assertEqual(self.successResultOf(first), ["result", "changed by the first caller"])
        self.assertEqual(self.successResultOf(second), ["result"])

    def test_one_caller_cancelling_leaves_the_others_and_the_work(self):
        first, second = self.shared.get(), self.shared.get()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertFalse(self.work.running[0].called)
        self.work.running[0].callback("done")
        self.assertEqual(self.successResultOf(second), "done")

    def test_the_arguments_of_the_call_that_starts_the_work(self):
        self.shared.get("thread pool A", fast=True)
        self.shared.get("thread pool B")
        self.assertEqual(self.work.started, [(("thread pool A",), {"fast": True})])
        self.work.running[0].callback(None)
        self.shared.get("thread pool B")
        self.assertEqual(self.work.started[1], (("thread pool B",), {}))

    def test_work_that_ends_at_once(self):
        shared = SharedResult(lambda: defer.succeed("ready"))
        self.assertEqual(self.successResultOf(shared.get()), "ready")
        self.assertFalse(shared.running)
