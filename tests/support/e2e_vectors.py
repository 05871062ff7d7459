"""The test vectors of end-to-end transfers (docs/protocol.md section 17.13), from fixed inputs.

``compute()`` runs the project's own code (``protocol/merkle.py``,
``protocol/e2e.py``, ``protocol/messages.py``) on ``INPUTS``; ``OUTPUTS``
holds what docs/protocol.md publishes, so a change to any format fails the
suite (tests/test_e2e_vectors.py), which also recomputes every output from
the page's formulas with bare primitives and checks the page shows each one.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives.asymmetric import x25519

from onion_twisted.protocol import bridged, e2e, merkle, messages, wire

PIECE = 262144


def content(size: int) -> bytes:
    """The vectors' file of ``size`` bytes: byte i is i mod 251."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


INPUTS = {
    "x": bytes(range(0xa0, 0xc0)).hex(),  # the requester's ephemeral X25519 private key
    "y": bytes(range(0xc0, 0xe0)).hex(),  # the sharer's ephemeral X25519 private key
    "transfer": "8c1f4a5e-2d3b-4c6a-9e7f-0b1a2c3d4e5f",
    "size": 3 * PIECE + 1000,             # 787 432 bytes: four pieces, the last of 1 000 bytes
    "chunk_size": PIECE,                  # 256 KiB: one piece a chunk, four chunks
    "root_sizes": [0, 1, PIECE, PIECE + 1, 3 * PIECE],
}

OUTPUTS = {
    "sha256": "15a4959c016cd4fc6276fe346d73a5948a95cc60765491cfa5ba9a72a2e124f9",
    "leaf_0": "31a1f9dea0169551092d05e8bf4a446228c8c3eb4c9b713c66adcb7fd53c89be",
    "leaf_1": "e31bdc63577fe76f6441014aaaa2226d9ffce11b44d0d510cade132b79fd7d76",
    "leaf_2": "c7f1bde9e1efa7d1385d51b077ea87b0c3860d28da43d5d6f221e845c4c2360f",
    "leaf_3": "20f72781ea6775025dabe3e4fc1056e2d30abae6bd48c462d878d91222694231",
    "root": "c40097ea8784e50bac73c20b131d3f2c41ac77f2f9124b969a50c02c276c80f5",
    "X": "605a725d2a4adfeeb1a29e17edd621c1b7593ee8cdbc44ac6c4ab6e2f805d23c",
    "Y": "dc2cca31e8e43bbd91dff7e475cca3347eb478107d5bd765aba4ae4a30c35d44",
    "X_b64": "YFpyXSpK3+6xop4X7dYhwbdZPujNvESsbEq24vgF0jw=",
    "Y_b64": "3CzKMejkO72R3/fkdcyjNH60eBB9W9dlq6SuSjDDXUQ=",
    "shared_secret": "3b87c5035cce13678dd93d2dbc3a3d42039ebec86444a1ff82cd61b84c6fe968",
    "K": "592b06143a0a51a9870707f0a5bee3cb5e7ac3a5f1b57bfa6974745afc8ed7d9",
    "leaves_aad": (
        "6f6e696f6e2d687474702f32207472616e736665722d7832353531392d616573"
        "32353667636d2d313a6c6561766573002438633166346135652d326433622d34"
        "6336612d396537662d306231613263336434653566"
    ),
    "sealed_leaves": (
        "cd7c47a0a2fa4ec423a75207c6936bc688e49e78691b5df33dc2426dd9e0cee1"
        "2b9784cce6f8f68f26405067a9e7cf23add57edb8b65058c89f4341971b35ce5"
        "d1208c6270712d459f18c0959191e863cc6bd804ad32206a3eb8192a3188a933"
        "79690cff6e0c179609e488080f18a519110ffa89cb42d39847216d495eece4ef"
        "d9d0e6ea57c1bdf49edc1876f1f70eee"
    ),
    "transfer_start": (
        '{"type":"transfer_start","transfer":"8c1f4a5e-2d3b-4c6a-9e7f-0b1a2c3d4e5f",'
        '"chunk_size":262144,"key":"3CzKMejkO72R3/fkdcyjNH60eBB9W9dlq6SuSjDDXUQ=",'
        '"leaves":"zXxHoKL6TsQjp1IHxpNrxojknnhpG13zPcJCbdngzuErl4TM5vj2jyZAUGep588jrdV+'
        '24tlBYyJ9DQZcbNc5dEgjGJwcS1FnxjAlZGR6GPMa9gErTIgaj64GSoxiKkzeWkM/24MF5YJ5IgIDxil'
        'GREP+onLQtOYRyFtSV7s5O/Z0ObqV8G99J7cGHbx9w7u"}'
    ),
    "request": (
        '{"type":"request","file":"vector.bin","chunk_size":262144,'
        '"sha256":"15a4959c016cd4fc6276fe346d73a5948a95cc60765491cfa5ba9a72a2e124f9",'
        '"root":"c40097ea8784e50bac73c20b131d3f2c41ac77f2f9124b969a50c02c276c80f5",'
        '"key":"YFpyXSpK3+6xop4X7dYhwbdZPujNvESsbEq24vgF0jw="}'
    ),
    "chunk_0_nonce": "000000000000000000000001",
    "chunk_0_aad": (
        "6f6e696f6e2d687474702f32207472616e736665722d7832353531392d616573"
        "32353667636d2d313a6368756e6b002438633166346135652d326433622d3463"
        "36612d396537662d3062316132633364346535660000000000000000"
    ),
    "sealed_chunk_0_size": 262160,
    "sealed_chunk_0_head": "4ffc28a135e53e862d554314a6ff50a1",
    "sealed_chunk_0_tag": "0b0cd42240641237fb4368ba7a2fc342",
    "sealed_chunk_0_sha256": "378896fc303856a8ec677290aaf9ca0221c0cd5d7d62cccd33924cc711d64e3f",
    "chunk_3_nonce": "000000000000000000000004",
    "sealed_chunk_3_size": 1016,
    "sealed_chunk_3_tag": "fd7a78625cd1e07ea2636c3f79a9d1dc",
    "sealed_chunk_3_sha256": "238d493c23bfd2e03393b636e2703a57eaf8290b7a00841f43d14da9698ac91d",
    "file_chunk_3_sha256": "4b9812a6d2476b375650742f4938fbe965cde5e759d428197fe7835f1c072999",
    "root_of_0": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "root_of_1": "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "root_of_262144": "31a1f9dea0169551092d05e8bf4a446228c8c3eb4c9b713c66adcb7fd53c89be",
    "root_of_262145": "0b9bcb3fe0aaafd27a9b5405c265989d6a9a77967e29943f5879ef85ba163a3d",
    "root_of_786432": "f9d38948fcef39d0f9902e0e24bcfd16ac08a202d565760b7c07a6ed0869dbbf",
}


def _key(hex_text: str) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_text))


def compute(inputs=INPUTS) -> dict:
    transfer, chunk_size = inputs["transfer"], inputs["chunk_size"]
    data = content(inputs["size"])
    sha, leaves = hashlib.sha256(data).hexdigest(), merkle.leaf_hashes(data)
    hasher = merkle.FileHasher()
    for i in range(0, len(data), 100_000):  # blocks that do not line up with pieces
        hasher.update(data[i:i + 100_000])
    assert hasher.finish() == (sha, leaves)
    root = merkle.root_hex(leaves)
    merkle.check_leaves(leaves, root, len(data))

    x, y = _key(inputs["x"]), _key(inputs["y"])
    X = e2e.public_bytes(x)
    Y, sharer = e2e.sharer_side(X, transfer, private=y)
    requester = e2e.requester_side(x, Y, transfer)
    K = e2e.transfer_key(y, X, transfer, X, Y)
    assert e2e.transfer_key(x, Y, transfer, X, Y) == K

    sealed_leaves = sharer.seal_leaves(leaves)
    assert requester.open_leaves(sealed_leaves) == leaves
    start = bridged.transfer_start_message(transfer, chunk_size, Y, sealed_leaves)
    parsed = bridged.parse_transfer_start(wire.loads(start))
    assert (parsed.key, parsed.leaves) == (Y, sealed_leaves)

    count = -(-len(data) // chunk_size)
    sealed = [sharer.seal_chunk(i, data[i * chunk_size:(i + 1) * chunk_size]) for i in range(count)]
    for i, chunk in enumerate(sealed):
        plain = requester.open_chunk(i, chunk)
        assert merkle.chunk_matches(plain, i, chunk_size, leaves)
    last = count - 1
    chunk_message = bridged.sealed_chunk_message(transfer, last, chunk_size, sealed[last])
    assert bridged.is_sealed_chunk(wire.loads(chunk_message))
    request = messages.request_message("vector.bin", chunk_size, sha, root=root, key=X)

    outputs = {
        "sha256": sha,
        **{f"leaf_{i}": leaves[i * 32:(i + 1) * 32].hex() for i in range(len(leaves) // 32)},
        "root": root,
        "X": X.hex(),
        "Y": Y.hex(),
        "X_b64": base64.b64encode(X).decode(),
        "Y_b64": base64.b64encode(Y).decode(),
        "shared_secret": x.exchange(x25519.X25519PublicKey.from_public_bytes(Y)).hex(),
        "K": K.hex(),
        "leaves_aad": e2e.leaves_aad(transfer).hex(),
        "sealed_leaves": sealed_leaves.hex(),
        "transfer_start": start.decode(),
        "request": wire.dumps(request).decode(),
        "chunk_0_nonce": e2e.chunk_nonce(0).hex(),
        "chunk_0_aad": e2e.chunk_aad(transfer, 0).hex(),
        "sealed_chunk_0_size": len(sealed[0]),
        "sealed_chunk_0_head": sealed[0][:16].hex(),
        "sealed_chunk_0_tag": sealed[0][-16:].hex(),
        "sealed_chunk_0_sha256": hashlib.sha256(sealed[0]).hexdigest(),
        "chunk_3_nonce": e2e.chunk_nonce(last).hex(),
        "sealed_chunk_3_size": len(sealed[last]),
        "sealed_chunk_3_tag": sealed[last][-16:].hex(),
        "sealed_chunk_3_sha256": hashlib.sha256(sealed[last]).hexdigest(),
        "file_chunk_3_sha256": hashlib.sha256(chunk_message).hexdigest(),
    }
    for size in inputs["root_sizes"]:
        outputs[f"root_of_{size}"] = merkle.root_hex(merkle.leaf_hashes(content(size)))
    return outputs
