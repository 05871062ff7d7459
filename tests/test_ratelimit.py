"""ratelimit.py: token buckets for new circuits per source IP (PROTOCOL.md §3, 429)."""

from twisted.internet import task
from twisted.trial import unittest

from onion_twisted.net.ratelimit import RateLimiter


class RateLimiterTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)

    def test_burst_then_refusal(self):
        limiter = RateLimiter(self.clock, rate=1.0, burst=5)
        self.assertEqual([limiter.allow("a") for _ in range(7)], [True] * 5 + [False] * 2)

    def test_keys_are_independent(self):
        limiter = RateLimiter(self.clock, rate=1.0, burst=2)
        limiter.allow("a"), limiter.allow("a")
        self.assertFalse(limiter.allow("a"))
        self.assertTrue(limiter.allow("b"))

    def test_refill_with_clock(self):
        limiter = RateLimiter(self.clock, rate=2.0, burst=4)
        for _ in range(4):
            limiter.allow("a")
        self.assertFalse(limiter.allow("a"))
        self.clock.advance(0.4)  # 0.8 token
        self.assertFalse(limiter.allow("a"))
        self.clock.advance(0.1)  # 1 token
        self.assertTrue(limiter.allow("a"))
        self.assertFalse(limiter.allow("a"))

    def test_refill_caps_at_burst(self):
        limiter = RateLimiter(self.clock, rate=10.0, burst=3)
        limiter.allow("a")
        self.clock.advance(3600)
        self.assertEqual([limiter.allow("a") for _ in range(4)], [True, True, True, False])

    def test_refusals_do_not_extend_the_wait_forever(self):
        limiter = RateLimiter(self.clock, rate=1.0, burst=1)
        limiter.allow("a")
        for _ in range(8):  # hammering while empty (binary-exact steps)
            self.clock.advance(0.0625)
            self.assertFalse(limiter.allow("a"))
        self.clock.advance(0.5)
        self.assertTrue(limiter.allow("a"))

    def test_bounded_key_table(self):
        limiter = RateLimiter(self.clock, rate=1.0, burst=1, max_keys=3)
        for key in ("a", "b", "c"):
            self.assertTrue(limiter.allow(key))
        # All three buckets are empty: a newcomer is refused, the table does not grow.
        self.assertFalse(limiter.allow("d"))
        self.assertEqual(len(limiter), 3)
        self.clock.advance(1)  # every bucket refilled: they are forgotten first
        self.assertTrue(limiter.allow("d"))
        self.assertLessEqual(len(limiter), 3)

    def test_bounded_key_table_prunes_only_full_buckets(self):
        limiter = RateLimiter(self.clock, rate=1.0, burst=2, max_keys=2)
        limiter.allow("a")              # a: 1 token left
        limiter.allow("b"), limiter.allow("b")  # b: empty
        self.clock.advance(1)           # a full again, b has 1
        self.assertTrue(limiter.allow("c"))
        self.assertEqual(len(limiter), 2)
        # b was not forgotten: it still has only the one token it earned
        self.assertTrue(limiter.allow("b"))
        self.assertFalse(limiter.allow("b"))

    def test_many_keys_never_exceed_bound(self):
        limiter = RateLimiter(self.clock, rate=0.001, burst=1, max_keys=100)
        for i in range(1000):
            limiter.allow(f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(limiter), 100)
