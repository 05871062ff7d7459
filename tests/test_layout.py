"""The package's layout (issue 13): which wing imports which, module length, the twistd plugins.

The rules are read from the source with ``ast`` (tests/support/layout.py),
so a forbidden import is found even where it is never run. Each rule is
checked on the real tree (every offender listed, with file and line) and on
small synthetic trees, once with offenders (the checker finds each) and
once without (it finds none).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from twisted.trial import unittest

from tests.support.layout import MAX_LINES, Offence, import_offences, long_modules, plugin_offences

REPO = Path(__file__).resolve().parents[1]


def report(offences) -> str:
    return "\n" + "\n".join(str(o) for o in offences)


class RealTreeTests(unittest.TestCase):
    """The repository as it is."""

    def test_the_tree_is_found(self):
        self.assertTrue((REPO / "onion_twisted" / "protocol" / "wire.py").is_file())
        self.assertTrue((REPO / "twisted" / "plugins").is_dir())

    def test_wings_import_only_what_they_may(self):
        offences = import_offences(REPO)
        self.assertEqual(offences, [], report(offences))

    def test_no_module_is_over_400_lines(self):
        offences = long_modules(REPO)
        self.assertEqual(offences, [], report(offences))

    def test_the_plugins_import_nothing_of_the_package_at_import_time(self):
        offences = plugin_offences(REPO)
        self.assertEqual(offences, [], report(offences))


class SyntheticTree:
    """A small repository under a temp dir: ``write("onion_twisted/peer/x.py", source)``."""

    def __init__(self, root: str):
        self.root = Path(root)
        for wing in ("", "protocol", "net", "node", "tracker", "peer", "ops"):
            self.write(f"onion_twisted/{wing}/__init__.py".replace("//", "/"), "")
        self.write("twisted/plugins/plugins.py", """
            from twisted.application.service import ServiceMaker
            node = ServiceMaker("n", "onion_twisted.node.service", "a node", "n")
        """)

    def write(self, relative: str, source: str) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")


class ImportRuleTests(unittest.TestCase):
    def setUp(self):
        self.tree = SyntheticTree(self.mktemp())

    def test_allowed_imports_pass(self):
        self.tree.write("onion_twisted/protocol/wire.py", """
            import json
            from onion_twisted import PROTOCOL
            from onion_twisted.protocol import errors
        """)
        self.tree.write("onion_twisted/net/http.py", """
            from onion_twisted.protocol import wire
            from onion_twisted.net.config import x
            from . import keys
        """)
        for role in ("node", "tracker", "peer"):
            self.tree.write(f"onion_twisted/{role}/app.py", f"""
                from onion_twisted import PROTOCOL, __version__
                import onion_twisted.net.http_server
                from onion_twisted.protocol import wire
                from onion_twisted.{role} import other
                from .other import thing
                def later():
                    from onion_twisted.net import config
            """)
        self.tree.write("onion_twisted/ops/localnet.py", "from onion_twisted.peer import peer\n")
        self.tree.write("onion_twisted/__main__.py", "from onion_twisted.tracker import service\n")
        self.assertEqual(import_offences(self.tree.root), [])

    def test_a_role_importing_another_role_fails_with_file_and_line(self):
        self.tree.write("onion_twisted/peer/peer.py", """
            from onion_twisted.protocol import wire

            from onion_twisted.tracker.catalogue import MAX
            def later():
                import onion_twisted.node.relay
            from ..ops import localnet
            from onion_twisted import tracker
        """)
        offences = import_offences(self.tree.root)
        self.assertEqual([(o.path, o.line) for o in offences],
                         [("onion_twisted/peer/peer.py", 3), ("onion_twisted/peer/peer.py", 5),
                          ("onion_twisted/peer/peer.py", 6), ("onion_twisted/peer/peer.py", 7)])
        self.assertIn("imports onion_twisted.tracker.catalogue", offences[0].what)
        self.assertIn("imports onion_twisted.node.relay", offences[1].what)
        self.assertIn("imports onion_twisted.ops", offences[2].what)
        self.assertIn("imports onion_twisted.tracker", offences[3].what)

    def test_a_root_name_other_than_PROTOCOL_and_version_fails(self):
        self.tree.write("onion_twisted/node/relay.py", "from onion_twisted import PROTOCOL, helpers\nimport onion_twisted\n")
        offences = import_offences(self.tree.root)
        self.assertEqual([o.line for o in offences], [1, 2])
        self.assertIn("imports onion_twisted.helpers", offences[0].what)
        self.assertIn("imports the package root", offences[1].what)

    def test_protocol_importing_net_a_role_or_ops_fails(self):
        self.tree.write("onion_twisted/protocol/cells.py", """
            from onion_twisted.net import http_client
            from onion_twisted.node.circuits import RelayTable
            import onion_twisted.ops.localnet
            from ..peer import app
        """)
        offences = import_offences(self.tree.root)
        self.assertEqual([(o.path, o.line) for o in offences], [("onion_twisted/protocol/cells.py", n)
                                                                 for n in (1, 2, 3, 4)])

    def test_net_importing_a_role_fails(self):
        self.tree.write("onion_twisted/net/member_service.py", """
            from onion_twisted.protocol import wire
            from onion_twisted.tracker import registry
        """)
        self.tree.write("onion_twisted/net/__init__.py", "from ..node import relay\n")
        offences = import_offences(self.tree.root)
        self.assertEqual([(o.path, o.line) for o in offences],
                         [("onion_twisted/net/__init__.py", 1), ("onion_twisted/net/member_service.py", 2)])
        self.assertIn("a net module imports onion_twisted.node ", offences[0].what)


class LengthRuleTests(unittest.TestCase):
    def setUp(self):
        self.tree = SyntheticTree(self.mktemp())

    def test_modules_up_to_the_limit_pass_and_longer_ones_fail(self):
        self.tree.write("onion_twisted/peer/short.py", "x = 1\n" * MAX_LINES)
        self.tree.write("onion_twisted/peer/long.py", "x = 1\n" * (MAX_LINES + 1))
        self.tree.write("onion_twisted/long_root.py", "x = 1\n" * (MAX_LINES + 5))
        self.assertEqual(long_modules(self.tree.root), [
            Offence("onion_twisted/long_root.py", 405, "405 lines, over 400"),
            Offence("onion_twisted/peer/long.py", 401, "401 lines, over 400")])


class PluginRuleTests(unittest.TestCase):
    def setUp(self):
        self.tree = SyntheticTree(self.mktemp())

    def test_lazy_plugins_pass(self):
        self.tree.write("twisted/plugins/lazy.py", """
            from twisted.application.service import ServiceMaker
            class Maker:
                def makeService(self, options):
                    from onion_twisted.node import service
                    return service.makeService(options)
            make = lambda: __import__("onion_twisted.node")
        """)
        self.assertEqual(plugin_offences(self.tree.root), [])

    def test_an_init_file_fails(self):
        self.tree.write("twisted/plugins/__init__.py", "")
        self.assertEqual([(o.path, o.line) for o in plugin_offences(self.tree.root)],
                         [("twisted/plugins/__init__.py", 1)])

    def test_imports_of_the_package_at_import_time_fail(self):
        self.tree.write("twisted/plugins/eager.py", """
            import onion_twisted
            from onion_twisted.node import service
            try:
                import onion_twisted.peer.service as peer_service
            except ImportError:
                pass
            class Maker:
                from onion_twisted.tracker import service as tracker_service
            import importlib
            importlib.import_module("onion_twisted.ops.localnet")
        """)
        offences = plugin_offences(self.tree.root)
        self.assertEqual([(o.path, o.line) for o in offences], [("twisted/plugins/eager.py", n)
                                                                 for n in (1, 2, 4, 8, 10)])
        self.assertIn("imports onion_twisted.node", offences[1].what)
