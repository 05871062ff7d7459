"""Configuration from strings and options, and keys on disk."""

import os
import stat

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from onion_twisted.net import config, keys
from onion_twisted.protocol import crypto
from onion_twisted.node.service import Options


class ConfigTests(SynchronousTestCase):
    def test_defaults_when_nothing_given(self):
        cfg = config.parse("node")
        self.assertEqual(cfg["port"], 5000)
        self.assertEqual(cfg["max_body"], 8 * 1024 * 1024)
        self.assertEqual(cfg["hop_timeout"], 30.0)
        self.assertEqual(cfg["key_bits"], 2048)
        self.assertIs(cfg["unsafe_logging"], False)

    def test_file_overrides_defaults_and_options_override_file(self):
        cfg = config.parse("node", 'port = 6000\nmax_body = 2048\ntracker = "10.0.0.1"\n',
                           {"max_body": "4096"})
        self.assertEqual(cfg["port"], 6000)
        self.assertEqual(cfg["max_body"], 4096)
        self.assertEqual(cfg["tracker"], "10.0.0.1")

    def test_unknown_key_is_refused(self):
        self.assertRaises(config.ConfigError, config.parse, "node", "colour = 3\n")

    def test_wrong_type_is_refused(self):
        self.assertRaises(config.ConfigError, config.parse, "node", 'port = "five"\n')
        self.assertRaises(config.ConfigError, config.parse, "node", "port = 1.5\n")
        self.assertRaises(config.ConfigError, config.parse, "node", "", {"unsafe_logging": "maybe"})

    def test_minimum_is_enforced(self):
        self.assertRaises(config.ConfigError, config.parse, "node", "key_bits = 512\n")

    def test_malformed_toml_is_a_config_error(self):
        self.assertRaises(config.ConfigError, config.parse, "node", "port = = 1\n")

    def test_every_key_is_an_option(self):
        options = Options()
        options.parseOptions(["--max-body", "1234", "--unsafe-logging", "--tracker", "127.0.0.9:5000",
                              "--key-bits", "1024"])
        self.assertEqual(options.config["max_body"], 1234)
        self.assertIs(options.config["unsafe_logging"], True)
        self.assertEqual(options.config["tracker"], "127.0.0.9:5000")
        for key in config.ROLES["node"]:
            self.assertIn(key.option, {o[0] for o in options.optParameters} | {f[0] for f in options.optFlags})

    def test_config_file_option(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("max_circuits = 7\ncreate_burst = 3\n")
        options = Options()
        options.parseOptions(["--config", path, "--create-burst", "9", "--tracker", "127.0.0.9"])
        self.assertEqual(options.config["max_circuits"], 7)
        self.assertEqual(options.config["create_burst"], 9)

    def test_bad_option_value_ends_twistd_with_one_line(self):
        # Not a UsageError: twistd would print its whole usage text above the line that matters.
        e = self.assertRaises(SystemExit, Options().parseOptions, ["--port", "x", "--tracker", "127.0.0.9"])
        self.assertIsInstance(e, config.Refused)
        self.assertEqual(e.code, "onionnode: port: 'x' is not a int")

    def test_an_option_twistd_does_not_know_is_still_a_usage_error(self):
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--colour", "blue"])

    def test_a_node_or_peer_whose_tracker_is_itself_is_refused(self):
        from onion_twisted.peer import service as peer_service
        for options, argv in ((Options, []), (Options, ["--listen", "127.0.0.5", "--tracker", "127.0.0.5:5000"]),
                              (peer_service.Options, ["--listen", "127.0.0.7", "--tracker", "127.0.0.7"])):
            e = self.assertRaises(config.Refused, options().parseOptions, argv)
            self.assertIn("own address", e.code)
            self.assertEqual(len(e.code.splitlines()), 1)
        # Another port is another member: allowed.
        options = Options()
        options.parseOptions(["--listen", "127.0.0.5", "--tracker", "127.0.0.5:6000"])
        self.assertEqual(options.config["tracker"], "127.0.0.5:6000")

    def test_check_start_on_parsed_configurations(self):
        self.assertRaises(config.ConfigError, config.check_start, "node", config.parse("node"))
        config.check_start("node", config.parse("node", "", {"tracker": "127.0.0.10"}))
        config.check_start("tracker", config.parse("tracker"))  # the tracker has no tracker key
        e = self.assertRaises(config.ConfigError, config.check_start, "node",
                              config.parse("node", "", {"tracker": "127.0.0.10", "metrics_allow": "10.0.0.0/8,nope"}))
        self.assertEqual(str(e), "metrics_allow: 'nope' is not an IP address or network")
        e = self.assertRaises(config.ConfigError, config.check_start, "peer",
                              config.parse("peer", "", {"tracker": "127.0.0.10", "listen": "300.1.1.1"}))
        self.assertIn("listen", str(e))

    def test_new_keys_and_their_defaults(self):
        self.assertEqual(config.parse("node")["metrics_allow"], ["127.0.0.0/8", "::1"])
        self.assertEqual(config.parse("tracker")["metrics_allow"], ["127.0.0.0/8", "::1"])
        self.assertEqual(config.parse("peer")["name"], "")
        self.assertEqual(config.parse("peer", 'name = "alice"\n')["name"], "alice")
        self.assertNotIn("metrics_allow", config.parse("peer"))  # the peer's page is behind ui_allow

    def test_onion_http_2_keys_and_their_defaults(self):
        for role in ("node", "tracker", "peer"):
            self.assertIs(config.parse(role)["tls"], True, role)
        self.assertIs(config.parse("node")["accept_v1"], True)
        self.assertEqual(config.parse("node")["onion_key_lifetime"], 604800)
        self.assertEqual(config.parse("tracker")["onion_key_lifetime"], 604800)
        self.assertEqual(config.parse("peer")["ui_listen"], "")
        self.assertNotIn("accept_v1", config.parse("peer"))
        self.assertNotIn("ui_listen", config.parse("node"))
        e = self.assertRaises(config.ConfigError, config.check_start, "peer",
                              config.parse("peer", "", {"tracker": "127.0.0.10", "ui_listen": "300.1.1.1:80"}))
        self.assertIn("ui_listen", str(e))
        self.assertIs(config.parse("node")["speak_v2"], True)
        e = self.assertRaises(config.ConfigError, config.check_start, "node",
                              config.parse("node", "", {"tracker": "127.0.0.10", "speak_v2": False,
                                                        "accept_v1": False}))
        self.assertIn("no circuit at all", str(e))

    def test_a_switch_on_by_default_is_turned_off_with_no(self):
        options = Options()
        options.parseOptions(["--tracker", "127.0.0.9", "--no-tls", "--no-accept-v1"])
        self.assertIs(options.config["tls"], False)
        self.assertIs(options.config["accept_v1"], False)
        options = Options()
        options.parseOptions(["--tracker", "127.0.0.9"])
        self.assertIs(options.config["tls"], True)
        self.assertIs(options.config["accept_v1"], True)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--no-unsafe-logging"])

    def test_the_swarming_keys_of_a_peer_and_their_options(self):
        from onion_twisted.peer import service as peer_service
        cfg = config.parse("peer")
        self.assertEqual((cfg["max_upload_rate"], cfg["seed_downloads"]), (0, True))
        options = peer_service.Options()
        options.parseOptions(["--tracker", "127.0.0.9", "--max-upload-rate", "4000000", "--no-seed-downloads"])
        self.assertEqual(options.config["max_upload_rate"], 4_000_000)
        self.assertIs(options.config["seed_downloads"], False)
        self.assertEqual(config.parse("peer", "max_upload_rate = 0\n")["max_upload_rate"], 0)
        self.assertRaises(config.ConfigError, config.parse, "peer", "max_upload_rate = -1\n")
        self.assertRaises(config.ConfigError, config.parse, "peer", "max_upload_rate = 1.5\n")
        self.assertNotIn("max_upload_rate", config.parse("node"))

    def test_shipped_examples_list_every_key_with_its_default(self):
        here = os.path.dirname(os.path.abspath(__file__))
        for role in ("node", "tracker", "peer"):
            path = os.path.join(here, "..", "conf", f"{role}.toml")
            with open(path, encoding="utf-8") as f:
                text = f.read()
            self.assertEqual(config.parse(role, text), config.parse(role), role)
            for key in config.ROLES[role]:
                self.assertIn(f"\n{key.name} = ", "\n" + text, f"{role}: {key.name}")

    def test_every_role_has_its_twistd_options(self):
        from onion_twisted.peer import service as peer_service
        from onion_twisted.tracker import service as tracker_service
        for role, module in (("tracker", tracker_service), ("peer", peer_service)):
            options = module.Options()
            names = {o[0] for o in options.optParameters} | {f[0] for f in options.optFlags}
            for key in config.ROLES[role]:
                self.assertIn(key.option, names, f"{role}: {key.option}")


class KeyFileTests(SynchronousTestCase):
    def test_node_key_is_made_once_with_mode_0600_and_reused(self):
        data_dir = self.mktemp()
        first = keys.load_or_create_node_key(data_dir, 1024)
        path = os.path.join(data_dir, "node_key.pem")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        second = keys.load_or_create_node_key(data_dir, 1024)
        self.assertEqual(crypto.fingerprint(first), crypto.fingerprint(second))
        self.assertEqual(first.key_size, 1024)

    def test_loose_mode_is_tightened_on_load(self):
        data_dir = self.mktemp()
        keys.load_or_create_node_key(data_dir, 1024)
        path = os.path.join(data_dir, "node_key.pem")
        os.chmod(path, 0o644)
        keys.load_or_create_node_key(data_dir, 1024)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_tracker_key_is_made_once_with_mode_0600_and_reused(self):
        data_dir = self.mktemp()
        first = keys.load_or_create_tracker_key(data_dir)
        path = os.path.join(data_dir, "tracker_key")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        second = keys.load_or_create_tracker_key(data_dir)
        self.assertEqual(crypto.tracker_public_b64(first), crypto.tracker_public_b64(second))

    def test_key_smaller_than_1024_bits_is_refused(self):
        self.assertRaises(ValueError, keys.load_or_create_node_key, self.mktemp(), 512)
