"""What the tests share: fakes, in-memory worlds, and harnesses for real processes.

Stand-ins for one seam (``onion_twisted.protocol.interfaces``), each checked
with ``verifyObject`` in tests/test_fakes.py:

* ``fakes``: ``FakeOutbound`` (``IOutbound``, scripted routes per address)
  and ``FakeDirectory`` (``IDirectorySource``). A test that needs other
  answers subclasses them (``tracker_fakes.TrackerOutbound``,
  ``peer_network.NodeDirectory``, ``in_memory.MemberOutbound``) rather than
  writing a fake of its own.
* ``tracker_fakes``: the tracker alone (``TrackerHarness``) with the outbound
  that fails a kind of message or holds its answers, and the tracker tests'
  keys and addresses.

In-memory worlds (one ``task.Clock``, no socket; both are an
``in_memory.InMemoryWorld``). They differ in how a POST travels, and so stay
two:

* ``relay_network.Network``: real nodes around a fake tracker and hand-driven
  test peers; a POST is delivered at once (a call through the members, then
  the answer), and a target can be down, slow or holding its requests. Use it
  for a node's behaviour cell by cell (the test_relay_* modules): the test
  builds circuits itself and awaits each answer.
* ``peer_network.Network``: a real tracker, four real nodes and two real
  ``Peer`` members; every delivery and every answer waits in a queue that
  ``pump``/``run`` advance one at a time (with the clock). Use it for what
  peers do over time: circuits built and rebuilt, announces, downloads,
  faults (test_peer*, test_faults' in-memory cases). It also answers GETs
  (``/identity``, ``/nodes``) and records every POST with its status.

In-memory HTTP with a real twisted.web channel: ``memory_http`` (treq over
``iosim``, chosen client IP) for the Klein apps; ``fuzz.exchange`` for raw
bytes.

Real processes: ``processes`` (twistd members, ``StatusOutbound``),
``faults`` (a network of them for the fault tests), ``peer_side`` (the test
process as a peer), ``fake_tracker``, ``lying_peer`` and ``http10_peer``
(programs the process tests start), ``browser`` (Playwright).

Others: ``deferreds`` (``inline``: an async test method as a Deferred),
``layout`` (the package's import and size rules, for test_layout).
"""
