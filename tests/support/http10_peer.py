"""A peer of onion-http/1 written from PROTOCOL.md sections 1-9 alone, as an
outside implementer would write it: the standard library's ``http.server``
as it comes (``HTTPServer`` + ``BaseHTTPRequestHandler``, HTTP/1.0, so the
connection closes after every answer, one request at a time, a listen
backlog of 5), ``http.client`` for its own requests, and ``cryptography``
for RSA-OAEP and AES-GCM. It imports nothing of onion_twisted, so it tests
the project against the contract, not against itself.

    python tests/support/http10_peer.py --ip 127.R1.R2.H --tracker 127.R1.R2.1:5000 \\
        [--tracker-key B64] [--share DIR] [--download NAME [--sha256 HEX] --out DIR] \\
        --status FILE [--window 8] [--chunk-size 262144] [--stop-after K]

It fetches the directory from the tracker, builds a circuit through three
distinct nodes (CREATE, EXTEND, EXTEND, EXTEND to the tracker carrying its
``ls``), announces the regular files of ``--share`` with name, size and
sha256, and then:

* as a sharer, answers each ``request`` the tracker sends back by streaming
  ``file_chunk`` messages with ``--window`` of them in flight (the project
  sharer's default is 8), then ``transfer_end``; ``--stop-after K`` makes
  its first upload stop silently after K chunks (a sharer that went away);
* as a requester (``--download``), waits until the catalogue lists the
  file, sends ``request``, writes the chunks at I x N (they may come before
  the ``transfer`` reply), and on ``transfer_end`` checks the sha256 and
  only then moves the file into ``--out``. It does not ask again: a
  transfer that stops leaves it waiting, which the test sees.

Progress is the JSON object in ``--status`` (rewritten atomically on every
change): ``state`` (starting, connected, requesting, receiving, done,
failed), ``circuit``, ``download`` and ``uploads``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORWARD, BACKWARD = b"onion-http/1 forward", b"onion-http/1 backward"   # section 2
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PORT = 5000


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def split_address(text: str) -> tuple[str, int]:
    """``HOST`` or ``HOST:PORT`` (section 1); IPv4 and names only, enough for a test."""
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    return host, int(port) if port else PORT


class HopError(Exception):
    pass


class Peer:
    def __init__(self, args):
        self.ip, self.port = args.ip, args.port
        self.tracker = args.tracker
        self.tracker_key = args.tracker_key
        self.share = args.share
        self.window = args.window
        self.stop_after = args.stop_after
        self.status_path = args.status
        self.lock = threading.Lock()
        self.cid = str(uuid.uuid4())
        self.hops: list[tuple[str, AESGCM]] = []   # (address, session key), entry first
        self.seen: list[set] = []                   # backward nonces seen, per hop (section 2, replay)
        self.status = {"pid": os.getpid(), "state": "starting", "circuit": [], "catalogue": [],
                       "download": None, "uploads": {"started": 0, "finished": 0, "stopped": 0,
                                                     "chunks_sent": 0, "errors": []}}
        self.download = None
        self.done = threading.Event()

    # --- status -----------------------------------------------------------------------

    def save_status(self, write: bool = True, **changes) -> None:
        with self.lock:
            self.status.update(changes)
            data = dumps(self.status)
        if not write:
            return
        tmp = f"{self.status_path}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.status_path)

    # --- HTTP out (section 1: sent from our own IP) ------------------------------------

    def http(self, method: str, address: str, path: str = "/", body: bytes | None = None):
        host, port = split_address(address)
        conn = http.client.HTTPConnection(host, port, timeout=120, source_address=(self.ip, 0))
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheader("X-Onion-Signature"), response.read()
        finally:
            conn.close()

    def post_cell(self, payload) -> dict:
        status, _, body = self.http("POST", self.hops[0][0], "/", dumps({"CID": self.cid, "payload": payload}))
        if status != 200:
            raise HopError(f"entry node answered {status}: {body[:200]!r}")
        return json.loads(body)

    # --- layers (section 2) -------------------------------------------------------------

    def onion(self, plaintext: bytes, keys) -> str:
        for _, key in reversed(keys):
            nonce = os.urandom(12)
            plaintext = nonce + key.encrypt(nonce, plaintext, FORWARD)
        return b64(plaintext)

    def peel(self, payload: str, keys, remember: bool = True) -> bytes:
        data, nonces = base64.b64decode(payload, validate=True), []
        for (_, key), seen in zip(keys, self.seen):
            nonce = data[:12]
            if nonce in seen:
                raise HopError("replayed backward layer")
            nonces.append(nonce)
            data = key.decrypt(nonce, data[12:], BACKWARD)
        if remember:
            for nonce, seen in zip(nonces, self.seen):
                seen.add(nonce)
        return data

    # --- the directory and the circuit (sections 4, 5, 6) -------------------------------

    def fetch_directory(self) -> list[dict]:
        status, signature, body = self.http("GET", self.tracker, "/nodes")
        if status != 200:
            raise HopError(f"tracker answered {status} for /nodes")
        key = self.tracker_key
        if not key:  # trust on first use (section 6)
            key = json.loads(self.http("GET", self.tracker, "/identity")[2])["public_key"]
            print(f"trusting the tracker key from /identity: {key}", file=sys.stderr)
        Ed25519PublicKey.from_public_bytes(base64.b64decode(key)).verify(base64.b64decode(signature), body)
        return json.loads(body)["nodes"]

    def build_circuit(self) -> dict:
        nodes = random.sample(self.fetch_directory(), 3)   # three distinct nodes
        for i, node in enumerate(nodes):
            public = serialization.load_pem_public_key(node["public_key"].encode("ascii"))
            secret = os.urandom(16)
            sealed = b64(public.encrypt(secret, OAEP))
            built = list(self.hops)
            self.hops.append((node["address"], AESGCM(secret)))
            self.seen.append(set())
            if i == 0:
                reply = self.post_cell(sealed)                                      # CREATE
            else:
                reply = self.post_cell(self.onion(dumps({"to": node["address"], "relay": sealed}), built))
            if json.loads(self.peel(reply["payload"], self.hops)) != {"type": "created"}:
                raise HopError(f"hop {i + 1} did not answer created")
        reply = self.send({"to": self.tracker, "relay": self.ls_message()})         # EXTEND to the tracker
        self.save_status(state="connected", circuit=[n["address"] for n in nodes],
                         catalogue=reply.get("files", []))
        return reply

    def send(self, message: dict) -> dict | None:
        """A message to the tracker (or a chunk for the bridge) through the circuit; the reply."""
        reply = self.post_cell(self.onion(dumps(message), self.hops))
        if "payload" not in reply:
            return None
        return json.loads(self.peel(reply["payload"], self.hops))

    def ls_message(self) -> dict:
        files = []
        for name in sorted(os.listdir(self.share)) if self.share else []:
            path = os.path.join(self.share, name)
            if os.path.isfile(path) and not os.path.islink(path) and not name.startswith("."):
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                files.append({"name": name, "size": os.path.getsize(path), "sha256": digest.hexdigest()})
        return {"type": "ls", "files": files}

    # --- cells the far end starts (section 5) -------------------------------------------

    def receive(self, source_ip: str, body: bytes) -> tuple[int, dict]:
        cell = json.loads(body)
        if cell.get("CID") != self.cid:
            return 404, {"error": "unknown_circuit", "detail": "not this peer's circuit"}
        if source_ip != split_address(self.hops[0][0])[0]:
            return 403, {"error": "forbidden", "detail": "not this circuit's entry node"}
        if cell.get("destroy"):
            self.save_status(state="failed", error="the network destroyed the circuit")
            self.done.set()
            return 200, {}
        with self.lock:  # one peel at a time: the nonce sets are shared
            message = json.loads(self.peel(cell["payload"], self.hops))
        kind = message.get("type")
        if kind == "request":
            threading.Thread(target=self.upload, args=(message,), daemon=True).start()
        elif kind == "file_chunk" and self.download is not None:
            self.download.chunk(message)
        elif kind == "transfer_end" and self.download is not None:
            self.download.end(message)
        return 200, {}

    # --- sharing (section 8) -----------------------------------------------------------------

    def upload(self, request: dict) -> None:
        transfer, name = request["transfer"], request["file"]
        chunk_size = request.get("chunk_size", 262144)
        self.count_upload("started")
        if not isinstance(name, str) or "/" in name or name in (".", "..") or not self.share \
                or not os.path.isfile(os.path.join(self.share, name)):
            self.send({"type": "transfer_end", "transfer": transfer, "status": "error", "detail": "no such file"})
            return
        path = os.path.join(self.share, name)
        size = os.path.getsize(path)
        count = (size + chunk_size - 1) // chunk_size
        ranges = request.get("chunks") or [[0, count]]
        indexes = [i for a, b in ranges for i in range(max(a, 0), min(b, count))]
        stop = self.stop_after
        self.stop_after = None  # only the first upload stops early
        failed = []
        slots = threading.Semaphore(self.window)  # at most ``window`` chunks unacknowledged

        def send_chunk(index: int, data: bytes) -> None:
            try:
                reply = self.send({"type": "file_chunk", "transfer": transfer, "file": name, "chunk_idx": index,
                                   "chunk_size": chunk_size, "size": size, "data": b64(data)})
                if reply is not None and reply.get("type") == "error":
                    failed.append(f"chunk {index}: {reply.get('error')}: {reply.get('detail')}")
                else:
                    self.count_upload("chunks_sent")
            except Exception as e:  # noqa: BLE001 - the upload stops, the status says why
                failed.append(f"chunk {index}: {e!r}")
            finally:
                slots.release()

        with open(path, "rb") as f, ThreadPoolExecutor(self.window) as pool:
            for n, index in enumerate(indexes):
                if failed or (stop is not None and n >= stop):
                    break
                slots.acquire()
                data = os.pread(f.fileno(), chunk_size, index * chunk_size)
                pool.submit(send_chunk, index, data)
        if failed or (stop is not None and stop < len(indexes)):
            self.count_upload("stopped", error=failed[0] if failed else f"stopped after {stop} chunks on purpose")
            return
        self.send({"type": "transfer_end", "transfer": transfer, "status": "ok"})
        self.count_upload("finished")

    def count_upload(self, key: str, error: str | None = None) -> None:
        with self.lock:
            uploads = self.status["uploads"]
            uploads[key] += 1
            if error:
                uploads["errors"].append(error)
        self.save_status()

    # --- downloading (section 8) ---------------------------------------------------------------

    def fetch(self, name: str, sha256: str | None, out: str, chunk_size: int) -> None:
        while True:  # until the catalogue lists the file
            reply = self.send({"type": "list"})
            files = reply.get("files", []) if reply else []
            self.save_status(catalogue=files)
            if any(f["name"] == name and (sha256 is None or f["sha256"] == sha256) for f in files):
                break
            time.sleep(0.2)  # polling the tracker, as a user's client would
        self.download = Download(self, name, sha256, out)
        self.save_status(state="requesting")
        request = {"type": "request", "file": name, "chunk_size": chunk_size}
        if sha256:
            request["sha256"] = sha256
        reply = self.send(request)
        if not reply or reply.get("type") != "transfer":
            self.save_status(state="failed", error=f"the tracker answered {reply}")
            return
        self.download.transfer_known(reply)
        self.done.wait()  # the naive client: no stall timer, no second request


class Download:
    def __init__(self, peer: Peer, name: str, sha256: str | None, out: str):
        self.peer, self.name, self.sha256, self.out = peer, name, sha256, out
        self.lock = threading.Lock()
        self.transfer = None                 # from the tracker's reply
        self.early: set[str] = set()         # transfer ids of chunks that came before it
        self.size = self.chunk_size = None
        self.have: set[int] = set()
        self.ended = None                    # the transfer_end that ended it
        self.pending_end = None              # a transfer_end that came before the reply naming it
        os.makedirs(out, exist_ok=True)
        self.part = os.path.join(out, "." + name + ".part")
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def report(self, write: bool = True, **extra) -> None:
        count = None if self.size is None else (self.size + self.chunk_size - 1) // self.chunk_size
        self.peer.save_status(write, download={"file": self.name, "transfer": self.transfer, "size": self.size,
                                               "chunks": len(self.have), "count": count, "ended": self.ended},
                              **extra)

    def ours(self, message: dict) -> bool:
        return message.get("file") == self.name and (self.transfer is None or message.get("transfer") == self.transfer)

    def transfer_known(self, reply: dict) -> None:
        with self.lock:
            self.transfer = reply["transfer"]
            self.size, self.chunk_size = reply["size"], reply["chunk_size"]
            early = self.pending_end if (self.pending_end or {}).get("transfer") == self.transfer else None
            if early and not self.ended:
                self.ended = early
        self.report(state="receiving")
        if early:
            self.finish(early)

    def chunk(self, message: dict) -> None:
        with self.lock:
            if not self.ours(message) or self.ended:
                return
            if self.transfer is None:
                self.early.add(message["transfer"])
            self.size, self.chunk_size = message["size"], message["chunk_size"]
            data = base64.b64decode(message["data"], validate=True)
            os.pwrite(self.fd, data, message["chunk_idx"] * self.chunk_size)   # at I x N
            self.have.add(message["chunk_idx"])
        self.report(write=False)  # written once the hop has its answer (make_handler)

    def end(self, message: dict) -> None:
        with self.lock:
            if self.ended:
                return
            transfer = message.get("transfer")
            if self.transfer is None and transfer not in self.early:
                self.pending_end = message   # may be ours: the reply naming it is still on its way
                return
            if self.transfer is not None and transfer != self.transfer:
                return
            self.ended = message
        self.finish(message)

    def finish(self, message: dict) -> None:
        if message.get("status") != "ok":
            self.report(state="failed", error=f"the sharer stopped: {message.get('detail')}")
        else:
            count = (self.size + self.chunk_size - 1) // self.chunk_size
            os.ftruncate(self.fd, self.size)
            digest = hashlib.sha256()
            with open(self.part, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            if len(self.have) != count:
                self.report(state="failed", error=f"transfer_end with {len(self.have)} of {count} chunks")
            elif self.sha256 and digest.hexdigest() != self.sha256:
                self.report(state="failed", error="sha256 mismatch")
            else:
                os.replace(self.part, os.path.join(self.out, self.name))   # visible only now
                self.report(state="done", sha256=digest.hexdigest())
        self.peer.done.set()


def make_handler(peer: Peer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"   # BaseHTTPRequestHandler's own default: close after each answer

        def answer(self, status: int, obj: dict) -> None:
            body = dumps(obj)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/identity":
                self.answer(200, {"role": "peer", "address": f"{peer.ip}:{peer.port}", "public_key": None,
                                  "fingerprint": None, "protocol": "onion-http/1"})
            else:
                self.answer(404, {"error": "not_found", "detail": "no such page"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                status, obj = peer.receive(self.client_address[0], body)
            except Exception as e:  # noqa: BLE001 - a bad cell is a 400, never a crash
                status, obj = 400, {"error": "bad_request", "detail": type(e).__name__}
            self.answer(status, obj)
            # Bookkeeping after the answer, as many servers log after answering: the
            # connection closes a moment after the hop has read its answer.
            peer.save_status()

        def log_message(self, fmt, *args):
            pass  # one line per chunk would be noise; the status file tells the story

    return Handler


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ip", required=True)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--tracker", required=True)
    parser.add_argument("--tracker-key", default="")
    parser.add_argument("--share")
    parser.add_argument("--download")
    parser.add_argument("--sha256")
    parser.add_argument("--out")
    parser.add_argument("--status", required=True)
    parser.add_argument("--window", type=int, default=8)   # the project sharer's default (sharing.DEFAULT_WINDOW)
    parser.add_argument("--chunk-size", type=int, default=262144)
    parser.add_argument("--stop-after", type=int)
    args = parser.parse_args(argv)

    peer = Peer(args)
    server = HTTPServer((args.ip, args.port), make_handler(peer))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        peer.build_circuit()
        if args.download:
            peer.fetch(args.download, args.sha256, args.out, args.chunk_size)
        while True:  # keep the circuit known to every hop (idle timeouts, section 4)
            time.sleep(30)
            peer.send({"type": "list"})
    except HopError as e:
        peer.save_status(state="failed", error=str(e))
        return 1
    finally:
        if peer.hops:  # section 9: a stopping peer destroys its circuit
            try:
                peer.http("POST", peer.hops[0][0], "/", dumps({"CID": peer.cid, "destroy": True}))
            except OSError:
                pass
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
