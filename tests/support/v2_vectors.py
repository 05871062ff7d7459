"""The onion-http/2 test vectors of docs/protocol.md, computed from their fixed inputs.

``compute()`` runs the project's own code on the inputs; tests/vectors/onion-http-2.json
holds the outputs as published, so a change to any format fails the suite
(tests/test_v2_vectors.py), and every output must appear in docs/protocol.md.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric import x25519

from onion_twisted.protocol import ntor, onion2


def _key(hex_text: str) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_text))


INPUTS = {
    "ID": hashlib.sha256(b"onion-http/2 test vector member").hexdigest(),
    "b": bytes(range(0x40, 0x60)).hex(),   # the member's onion private key
    "x": bytes(range(0x60, 0x80)).hex(),   # the client's ephemeral private key
    "y": bytes(range(0x80, 0xa0)).hex(),   # the member's ephemeral private key
    "message": '{"type":"list"}',
}


def compute(inputs=INPUTS) -> dict:
    member = bytes.fromhex(inputs["ID"])
    b, x, y = _key(inputs["b"]), _key(inputs["x"]), _key(inputs["y"])
    onion = ntor.raw_public(b)
    state, handshake = ntor.client_start(member, onion, private=x)
    server_keys, reply = ntor.server_reply(member, lambda key: b if key == onion else None, handshake,
                                           ephemeral=y)
    client_keys = state.finish(reply)
    message = inputs["message"].encode()
    padded = onion2.pad_message(message)
    forward_0 = client_keys.seal_forward(padded)
    forward_1 = client_keys.seal_forward(message)
    backward_0 = server_keys.seal_backward(message)
    assert onion2.unpad(server_keys.open_forward(forward_0)) == message
    assert client_keys.open_backward(backward_0) == message
    kf, kb, nf, nb = (getattr(server_keys, name) for name in ("_kf", "_kb", "_nf", "_nb"))
    return {
        "B": onion.hex(),
        "X": ntor.raw_public(x).hex(),
        "Y": ntor.raw_public(y).hex(),
        "handshake": handshake.hex(),
        "reply": reply.hex(),
        "Kf": kf.hex(), "Kb": kb.hex(), "Nf": nf.hex(), "Nb": nb.hex(),
        "padded_message_head": padded[:24].hex(),
        "padded_message_size": len(padded),
        # the padded message, counter 0: 1 048 bytes, published as its length and SHA-256
        "forward_layer_0_size": len(forward_0),
        "forward_layer_0_sha256": hashlib.sha256(forward_0).hexdigest(),
        "forward_layer_1": forward_1.hex(),  # the bare message, counter 1
        "backward_layer_0": backward_0.hex(),
        "chunk_class_262144": onion2.chunk_class(262144),
        "chunk_class_1048576": onion2.chunk_class(1048576),
    }
