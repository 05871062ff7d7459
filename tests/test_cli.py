"""``python -m onion_twisted get NAME``: the command line for scripts.

Most tests drive ``main`` with an injected ``fetch`` (a scripted peer), a
fake ``sleep`` that moves a fake clock, and StringIO streams: no socket, no
waiting. A few run the real urllib ``fetch`` against a tiny stdlib HTTP server
in a thread (answers at once) and against a closed port, and one runs
``python -m onion_twisted --help`` for real.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading

from twisted.trial import unittest

from onion_twisted import __main__ as cli

SHA = "ab" * 32


class Clock:
    def __init__(self):
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def download(state, bytes_=0, size=None, error=None, speed=0.0, path=None, file="song.ogg"):
    return {"file": file, "state": state, "bytes": bytes_, "size": size, "sha256": SHA if state == "done" else None,
            "error": error, "speed": speed, "path": path}


def status(*downloads):
    return {"circuit": {}, "shared": [], "catalogue": [], "downloads": list(downloads)}


PEER_IDENTITY = (200, {"role": "peer", "address": "127.0.0.1:5000", "public_key": None})


class ScriptedPeer:
    """``fetch``: answers the POST with ``accept``, ``GET /identity`` with ``identity``, and each
    other GET with the next of ``answers`` (an exception instance is raised; the last answer repeats)."""

    def __init__(self, accept=(202, download("queued")), answers=(), identity=PEER_IDENTITY):
        self.accept = accept
        self.answers = list(answers)
        self.identity = identity
        self.requests: list[tuple] = []

    def __call__(self, method, url, body=None):
        self.requests.append((method, url, body))
        if method == "POST":
            answer = self.accept
        elif url.endswith("/identity"):
            answer = self.identity
        else:
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class CLITestCase(unittest.TestCase):
    def run_cli(self, argv, peer):
        self.clock = Clock()
        self.out, self.err = io.StringIO(), io.StringIO()
        return cli.main(argv, fetch=peer, sleep=self.clock.sleep, clock=self.clock, out=self.out, err=self.err)


class GetTests(CLITestCase):
    def test_done_exits_0_and_prints_the_files_url(self):
        peer = ScriptedPeer(answers=[
            (200, status(download("requesting"))),
            (200, status(download("receiving", 512 * 1024, 1024 * 1024, speed=3 * 1024 * 1024))),
            (200, status(download("verifying", 1024 * 1024, 1024 * 1024))),
            (200, status(download("done", 1024 * 1024, 1024 * 1024, path="song.ogg"))),
        ])
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 0)
        self.assertEqual(peer.requests[0], ("POST", "http://127.0.0.1:5000/api/downloads", {"file": "song.ogg"}))
        self.assertEqual({r[:2] for r in peer.requests[1:]}, {("GET", "http://127.0.0.1:5000/api/status")})
        self.assertEqual(len(peer.requests), 5)
        self.assertEqual(self.clock.sleeps, [0.5] * 4)
        self.assertEqual(self.out.getvalue(), "http://127.0.0.1:5000/files/song.ogg\n")
        err = self.err.getvalue()
        self.assertIn("\r[" + "#" * 15 + " " * 15 + "]  50% 3.0 MiB/s receiving", err)
        self.assertIn("\r[" + "#" * 30 + "] 100% done", err)
        self.assertIn("downloaded and verified", err)

    def test_the_link_is_to_the_name_the_file_was_stored_under(self):
        peer = ScriptedPeer(answers=[(200, status(download("done", 3, 3, path="song (1).ogg")))])
        self.assertEqual(self.run_cli(["get", "song.ogg", "--peer", "127.0.0.9:5000/"], peer), 0)
        self.assertEqual(peer.requests[0][1], "http://127.0.0.9:5000/api/downloads")
        self.assertEqual(self.out.getvalue(), "http://127.0.0.9:5000/files/song%20%281%29.ogg\n")

    def test_failed_exits_1_with_the_error(self):
        peer = ScriptedPeer(answers=[(200, status(download("requesting"))),
                                     (200, status(download("failed", error="nobody shares this file")))])
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 1)
        self.assertIn("nobody shares this file", self.err.getvalue())
        self.assertEqual(self.out.getvalue(), "")

    def test_a_file_announced_without_sha256_says_so(self):
        peer = ScriptedPeer(answers=[(200, status(dict(download("done", 1, 1), unverified=True)))])
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 0)
        self.assertIn("announced no sha256", self.err.getvalue())
        self.assertNotIn("verified (", self.err.getvalue())

    def test_sha256_is_passed_on(self):
        peer = ScriptedPeer(answers=[(200, status(download("done", 1, 1)))])
        self.assertEqual(self.run_cli(["get", "song.ogg", "--sha256", SHA.upper()], peer), 0)
        self.assertEqual(peer.requests[0][2], {"file": "song.ogg", "sha256": SHA})

    def test_only_this_files_download_counts(self):
        peer = ScriptedPeer(answers=[
            (200, status(download("done", 1, 1, file="other"), download("receiving", 1, 2))),
            (200, status(download("failed", file="other", error="x"), download("done", 2, 2))),
        ])
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 0)
        self.assertEqual(len(peer.requests), 3)

    def test_timeout_exits_1(self):
        peer = ScriptedPeer(answers=[(200, status(download("receiving", 1, 10)))])
        self.assertEqual(self.run_cli(["get", "song.ogg", "--timeout", "3"], peer), 1)
        self.assertIn("not finished after 3 s", self.err.getvalue())
        self.assertEqual(self.clock.sleeps, [0.5] * 6)


class PeerTroubleTests(CLITestCase):
    def test_unreachable_peer_exits_2(self):
        peer = ScriptedPeer(accept=cli.Unreachable("Connection refused"))
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 2)
        self.assertIn("does not answer: Connection refused", self.err.getvalue())
        self.assertEqual(len(peer.requests), 1)

    def test_a_refused_request_exits_1_with_the_peers_reason(self):
        # The peer answered: it can be reached, so 2 would send a script looking for the wrong fault.
        for code, body in [(400, {"error": "bad_request", "detail": "file name is over 255 bytes"}),
                           (403, {"error": "forbidden", "detail": "this address may not use the peer's page"}),
                           (429, {"error": "rate_limited", "detail": "256 downloads are under way"})]:
            peer = ScriptedPeer(accept=(code, body))
            self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 1)
            self.assertIn(f"({code}): {body['detail']}", self.err.getvalue())
            self.assertEqual([m for m, _, _ in peer.requests], ["POST", "GET"])  # the refusal, then who refused

    def test_a_name_nobody_shares_exits_1(self):
        peer = ScriptedPeer(answers=[(200, status(download("failed", error="nobody shares this file")))])
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 1)
        self.assertIn("song.ogg: nobody shares this file", self.err.getvalue())

    def test_a_node_or_a_tracker_at_peer_is_named_and_exits_2(self):
        for role in ("node", "tracker"):
            peer = ScriptedPeer(accept=(404, {"error": "not_found", "detail": "Not Found"}),
                                identity=(200, {"role": role, "address": "127.0.0.11:5000"}))
            self.assertEqual(self.run_cli(["get", "song.ogg", "--peer", "127.0.0.11"], peer), 2)
            self.assertIn(f"error: http://127.0.0.11:5000 is not a peer (it is an onion_twisted {role})",
                          self.err.getvalue())

    def test_something_else_at_peer_exits_2(self):
        for identity in ((404, {}), (200, {"role": "printer"}), cli.Unreachable("reset")):
            peer = ScriptedPeer(accept=(405, {}), identity=identity)
            self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 2)
            self.assertIn("is not a peer (it has no /identity, so it is no onion_twisted member)",
                          self.err.getvalue())

    def test_a_bare_host_means_the_networks_port(self):
        for given, base in [("127.0.0.21", "http://127.0.0.21:5000"), ("127.0.0.21:6000", "http://127.0.0.21:6000"),
                            ("http://127.0.0.21/", "http://127.0.0.21:5000"), ("[::1]", "http://[::1]:5000"),
                            ("http://localhost:8080", "http://localhost:8080")]:
            peer = ScriptedPeer(answers=[(200, status(download("done", 1, 1)))])
            self.assertEqual(self.run_cli(["get", "song.ogg", "--peer", given], peer), 0, given)
            self.assertEqual(peer.requests[0][1], base + "/api/downloads", given)

    def test_a_moment_of_silence_is_forgiven(self):
        peer = ScriptedPeer(answers=[cli.Unreachable("reset"), cli.Unreachable("reset"),
                                     (200, status(download("done", 1, 1)))])
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 0)

    def test_a_peer_that_stops_answering_exits_2(self):
        peer = ScriptedPeer(answers=[(200, status(download("receiving", 1, 10))), cli.Unreachable("refused")])
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 2)
        self.assertIn("stopped answering", self.err.getvalue())
        self.assertGreaterEqual(self.clock.now - 100.0, cli.UNREACHABLE_GRACE)
        self.assertLessEqual(self.clock.now - 100.0, cli.UNREACHABLE_GRACE + 1.0)

    def test_an_error_status_while_polling_exits_1(self):
        peer = ScriptedPeer(answers=[(500, {"error": "internal", "detail": "internal error"})])
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 1)
        self.assertIn("500: internal error", self.err.getvalue())

    def test_a_download_the_peer_forgot_exits_1(self):
        peer = ScriptedPeer(answers=[(200, status())])
        self.assertEqual(self.run_cli(["get", "song.ogg"], peer), 1)
        self.assertIn("no longer lists", self.err.getvalue())


class UsageTests(CLITestCase):
    def quiet(self, argv):
        peer = ScriptedPeer()
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = self.run_cli(argv, peer)
        return code, peer, stdout.getvalue() + stderr.getvalue() + self.err.getvalue()

    def test_usage_errors_exit_2_without_asking_the_peer(self):
        for argv in ([], ["get"], ["fetch", "x"], ["get", "x", "--bogus"], ["get", "x", "--sha256", "abc"],
                     ["get", "x", "--timeout", "0"], ["get", "x", "--timeout", "soon"]):
            code, peer, _ = self.quiet(argv)
            self.assertEqual(code, 2, argv)
            self.assertEqual(peer.requests, [], argv)

    def test_help(self):
        code, peer, text = self.quiet(["--help"])
        self.assertEqual(code, 0)
        self.assertIn("get", text)
        code, peer, text = self.quiet(["get", "--help"])
        self.assertEqual(code, 0)
        for option in ("--peer", "--sha256", "--timeout", "NAME"):
            self.assertIn(option, text)

    def test_python_dash_m(self):
        result = subprocess.run([sys.executable, "-m", "onion_twisted", "--help"], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("get", result.stdout)


class TrackerKeyTests(CLITestCase):
    def test_makes_the_key_once_and_prints_it_as_the_tracker_will_show_it(self):
        from onion_twisted.protocol import crypto
        from onion_twisted.net import keys

        data_dir = os.path.join(self.mktemp(), "tracker")
        self.assertEqual(self.run_cli(["tracker-key", data_dir], ScriptedPeer()), 0, self.err.getvalue())
        printed = self.out.getvalue().strip()
        self.assertEqual(oct(os.stat(os.path.join(data_dir, "tracker_key")).st_mode & 0o777), "0o600")
        self.assertEqual(oct(os.stat(data_dir).st_mode & 0o777), "0o700")
        # The tracker started on that data_dir loads the same key, and shows this one.
        self.assertEqual(crypto.tracker_public_b64(keys.load_or_create_tracker_key(data_dir)), printed)
        self.assertEqual(self.run_cli(["tracker-key", data_dir], ScriptedPeer()), 0)
        self.assertEqual(self.out.getvalue().strip(), printed)
        crypto.load_tracker_public_b64(printed)  # a key nodes and peers accept as tracker_key

    def test_a_damaged_key_file_exits_1(self):
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        with open(os.path.join(data_dir, "tracker_key"), "wb") as f:
            f.write(b"short")
        self.assertEqual(self.run_cli(["tracker-key", data_dir], ScriptedPeer()), 1)
        self.assertIn("cannot read or make the tracker key", self.err.getvalue())


class ProgressTests(unittest.TestCase):
    def test_lines(self):
        self.assertEqual(cli.progress_line(download("requesting")), "[" + " " * 30 + "]   0% requesting")
        self.assertEqual(cli.progress_line(download("receiving", 42, 100, speed=12.3 * 1024 * 1024)),
                         "[" + "#" * 12 + " " * 18 + "]  42% 12.3 MiB/s receiving")
        self.assertEqual(cli.progress_line(download("done", 0, 0)), "[" + "#" * 30 + "] 100% done")
        several = dict(download("receiving", 42, 100, speed=12.3 * 1024 * 1024), transfers=3)
        self.assertEqual(cli.progress_line(several),
                         "[" + "#" * 12 + " " * 18 + "]  42% 12.3 MiB/s from 3 sources receiving")

    def test_human(self):
        self.assertEqual([cli.human(n) for n in (0, 1023, 1024, 1536 * 1024, 5 * 1024 ** 4, None)],
                         ["0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 TiB", "?"])

    def test_the_bar_draws_over_itself(self):
        stream = io.StringIO()
        bar = cli.Bar(stream)
        bar.draw("long line")
        bar.draw("long line")   # unchanged: not drawn again
        bar.draw("short")
        bar.end()
        self.assertEqual(stream.getvalue(), "\rlong line\rshort    \n")


# --- the real fetch over HTTP ---------------------------------------------------------------------


class _FakePeerHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self, code, body: bytes, kind="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posts.append((self.path, self.headers.get("Content-Type"), body))
        request = json.loads(body)
        if self.server.role != "peer":
            self._answer(404, b'{"error": "not_found", "detail": "Not Found"}')
        elif request["file"] == "bad/name":
            self._answer(400, b'{"error": "bad_request", "detail": "file name has a path separator"}')
        else:
            self._answer(202, json.dumps(download("queued", file=request["file"])).encode())

    def do_GET(self):
        if self.path == "/identity":
            self._answer(200, json.dumps({"role": self.server.role}).encode())
        elif self.path == "/api/status":
            self.server.polls += 1
            state = "done" if self.server.polls >= 2 else "receiving"
            self._answer(200, json.dumps(status(download(state, 5, 5, path="song.ogg"))).encode())
        else:
            self._answer(500, b"<html>oops</html>", "text/html")


class RealFetchTests(unittest.TestCase):
    def setUp(self):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakePeerHandler)
        self.server.posts, self.server.polls, self.server.role = [], 0, "peer"
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def test_a_download_against_a_real_http_peer(self):
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["get", "song.ogg", "--peer", self.url], sleep=lambda s: None, out=out, err=err)
        self.assertEqual(code, 0, err.getvalue())
        self.assertEqual(out.getvalue(), self.url + "/files/song.ogg\n")
        [(path, kind, body)] = self.server.posts
        self.assertEqual((path, kind, json.loads(body)), ("/api/downloads", "application/json", {"file": "song.ogg"}))

    def test_a_node_at_peer_over_http(self):
        self.server.role = "node"
        err = io.StringIO()
        code = cli.main(["get", "song.ogg", "--peer", self.url], sleep=lambda s: None, out=io.StringIO(), err=err)
        self.assertEqual(code, 2)
        self.assertIn(f"{self.url} is not a peer (it is an onion_twisted node)", err.getvalue())

    def test_error_statuses_come_back_as_answers(self):
        self.assertEqual(cli.http_fetch("POST", self.url + "/api/downloads", {"file": "bad/name"}),
                         (400, {"error": "bad_request", "detail": "file name has a path separator"}))
        self.assertEqual(cli.http_fetch("GET", self.url + "/elsewhere"), (500, {}))  # not JSON: no body

    def test_a_proxy_in_the_environment_is_not_used(self):
        saved = {k: os.environ.get(k) for k in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY")}

        def restore():
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

        self.addCleanup(restore)
        for k in ("no_proxy", "NO_PROXY"):
            os.environ.pop(k, None)
        os.environ["http_proxy"] = os.environ["HTTP_PROXY"] = "http://127.0.0.1:9"
        code, answer = cli.http_fetch("GET", self.url + "/api/status")
        self.assertEqual(code, 200)


class UnreachableTests(unittest.TestCase):
    def closed_port_url(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return "http://127.0.0.1:%d" % port

    def test_a_closed_port_is_unreachable(self):
        self.assertRaises(cli.Unreachable, cli.http_fetch, "GET", self.closed_port_url() + "/api/status")

    def test_main_exits_2(self):
        err = io.StringIO()
        code = cli.main(["get", "x", "--peer", self.closed_port_url()], sleep=lambda s: None,
                        out=io.StringIO(), err=err)
        self.assertEqual(code, 2)
        self.assertIn("does not answer", err.getvalue())
