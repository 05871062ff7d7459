"""The file messages of PROTOCOL.md §8 and §13, with no I/O.

``ls``, ``list`` and ``files`` (announcing and the catalogue), ``request``
(a requester's to the tracker, and the tracker's to the sharing circuit),
``transfer`` (the tracker's answer) and ``error``; what crosses a bridge
(``file_chunk``, ``transfer_start``, ``transfer_end``) is ``bridged.py``.
Modelled on ``control.py``: for each message a frozen dataclass
(or a tuple where 100 000s are kept), the verifying parser and the builder
side by side, so the tracker, the sharer and the requester check a message
with one set of rules and write it with one key order.

A parser raises ``MessageError``: the tracker answers it with an ``error``
message, a sharer with a ``transfer_end`` of status ``error``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

from onion_twisted.protocol import wire
from onion_twisted.protocol.merkle import is_e2e_chunk_size

LS = "ls"
LIST = "list"
FILES = "files"
REQUEST = "request"
TRANSFER = "transfer"
FILE_CHUNK = "file_chunk"
TRANSFER_END = "transfer_end"
TRANSFER_START = "transfer_start"  # §13: the sharer's key and sealed leaf row, first over the bridge
ERROR = "error"
CHUNK_TYPES = (FILE_CHUNK, TRANSFER_START, TRANSFER_END)  # what crosses a bridge

MIN_CHUNK = 16 * 1024
MAX_CHUNK = 4 * 1024 * 1024
DEFAULT_CHUNK = 256 * 1024
MAX_RANGES = 65536
MAX_NAME_BYTES = 255
MAX_SIZE = 2 ** 53  # JSON-safe integers
MAX_TRANSFER_ID = 128  # characters; the tracker makes UUIDv4s, 36
MAX_EXCLUDED = 64  # transfers a request may name whose sources are not to be asked again
MAX_AVOIDED = 64  # transfers a request may name whose sources already serve the same download

#: The one spelling of a SHA-256 on the wire: 64 lowercase hex digits.
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SEPARATOR = re.compile(r"[/\\\x00]")
_CONTROL = re.compile(r"[\x00-\x1f]")
# Characters that make one name look like another, or look like nothing at all:
# DEL and the C1 controls; the bidi embeddings, overrides and isolates
# (U+202A-U+202E, U+2066-U+2069: "gpj.exe" shown as "exe.jpg") and the bidi
# marks (U+061C, U+200E, U+200F); the zero-width and invisible characters
# (U+200B-U+200D, U+2060-U+2064, U+FEFF).
_LOOKALIKE = re.compile("[\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


class MessageError(Exception):
    """A message refused: the tracker answers ``{"type": "error", ...}`` (``reply``)."""

    def __init__(self, error: str, detail: str):
        super().__init__(detail)
        self.error = error
        self.detail = detail

    def reply(self) -> dict:
        return error_message(self.error, self.detail)


# --- the fields ---------------------------------------------------------------------------

def is_sha256(value) -> bool:
    return isinstance(value, str) and SHA256_HEX.fullmatch(value) is not None


def check_sha256(value) -> str:
    if not is_sha256(value):
        raise MessageError("bad_request", "sha256 is not 64 lowercase hex digits")
    return value


def is_transfer_id(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_TRANSFER_ID


def check_name(name) -> str:
    """A file name as §8 allows it, in NFC: one path component, nothing that climbs
    out, nothing invisible or direction-changing (docs/protocol.md, file names).

    Names are compared in Unicode normal form C, so "é" typed as one code point
    or as e + U+0301 is one name: the tracker, the sharer and the requester all
    use the form this returns.
    """
    if not isinstance(name, str) or not name:
        raise MessageError("bad_request", "file name is not a non-empty string")
    if _LOOKALIKE.search(name):
        raise MessageError("bad_request", "file name has invisible, control or direction-changing characters")
    try:
        name = unicodedata.normalize("NFC", name)
    except UnicodeError:
        raise MessageError("bad_request", "file name is not valid Unicode") from None
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise MessageError("bad_request", "file name is over 255 bytes")
    if name in (".", "..") or _SEPARATOR.search(name):
        raise MessageError("bad_request", "file name has a path separator or is . or ..")
    if _CONTROL.search(name):
        raise MessageError("bad_request", "file name has control characters")
    return name


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(value) -> bool:
    return _is_integer(value) and 0 <= value <= MAX_SIZE


def _chunk_size(message: dict) -> int:
    chunk_size = message.get("chunk_size", DEFAULT_CHUNK)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK
    if not _is_integer(chunk_size) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise MessageError("bad_request", "chunk_size must be an integer from 16 KiB to 4 MiB")
    return chunk_size


def _chunks(message: dict) -> list | None:
    """The ``chunks`` of a request: half-open index ranges still wanted, or None (all)."""
    chunks = message.get("chunks")
    if chunks is not None:
        if not isinstance(chunks, list) or len(chunks) > MAX_RANGES:
            raise MessageError("bad_request", f"chunks must be a list of at most {MAX_RANGES} ranges")
        for r in chunks:
            if (not isinstance(r, list) or len(r) != 2 or not all(_is_integer(x) for x in r)
                    or not 0 <= r[0] < r[1] <= MAX_SIZE):
                raise MessageError("bad_request", "chunks: each range is [first, end) with 0 <= first < end")
    return chunks


def _transfer_id(message: dict) -> str:
    transfer = message.get("transfer")
    if not is_transfer_id(transfer):
        raise MessageError("bad_request", f"transfer is not a string of 1 to {MAX_TRANSFER_ID} characters")
    return transfer


def _optional_sha256(message: dict) -> str | None:
    sha = message.get("sha256")
    return None if sha is None else check_sha256(sha)


# --- ls, list, files ----------------------------------------------------------------------

class SharedFile(NamedTuple):
    # A tuple of atomic values: the garbage collector stops tracking it, which
    # matters with 100 000s of them (bench/tracker.py: full collections 4x shorter).
    name: str
    size: int | None
    sha256: str | None
    root: str | None = None  # §13: the Merkle root, announced by a /2 sharer

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        return (self.name, self.sha256, self.root)


def parse_files(files, max_files: int) -> tuple[SharedFile, ...]:
    """The ``files`` of an ``ls``: names (seed form) or {name, size, sha256} objects."""
    if not isinstance(files, list):
        raise MessageError("bad_request", "ls: files is not a list")
    if len(files) > max_files:
        raise MessageError("too_many_files", f"ls: at most {max_files} files per circuit")
    parsed = {}
    for f in files:
        if isinstance(f, str):
            shared = SharedFile(check_name(f), None, None)
        elif isinstance(f, dict):
            size = f.get("size")
            if size is not None and not _is_size(size):
                raise MessageError("bad_request", "ls: size is not a non-negative integer")
            sha, root = f.get("sha256"), f.get("root")
            if root is not None and (size is None or not is_sha256(root)):
                raise MessageError("bad_request", "ls: root is not 64 lowercase hex digits with a size")
            shared = SharedFile(check_name(f.get("name")), size, None if sha is None else check_sha256(sha), root)
        else:
            raise MessageError("bad_request", "ls: a file is neither a name nor an object")
        parsed[shared.key] = shared
    return tuple(parsed.values())


def ls_message(files: list) -> dict:
    """``files``: names, or ``{"name", "size", "sha256", "root"?}`` objects."""
    return {"type": LS, "files": list(files)}


def list_message() -> dict:
    return {"type": LIST}


def parse_files_reply(message) -> list[dict] | None:
    """The catalogue of a ``files`` reply, its rows as sent (each shown, not trusted);
    None if ``message`` is not a ``files`` reply with a list."""
    if not isinstance(message, dict) or message.get("type") != FILES or not isinstance(message.get("files"), list):
        return None
    return [f for f in message["files"] if isinstance(f, dict)]


def files_message(listing: list[dict]) -> dict:
    """``listing``: ``{"name", "size", "sha256", "root", "sources"}`` rows."""
    return {"type": FILES, "files": listing}


# --- request: the requester's, to the tracker ---------------------------------------------

@dataclass(frozen=True, slots=True)
class FileRequest:
    file: str
    sha256: str | None
    chunk_size: int
    chunks: list | None
    root: str | None = None
    key: bytes | None = None          # §13: the requester's ephemeral X25519 public key
    exclude: tuple[str, ...] = ()     # transfers whose sources are not to be asked again
    avoid: tuple[str, ...] = ()       # transfers whose sources already serve this download (another source)


def _optional_root(message: dict) -> str | None:
    root = message.get("root")
    if root is not None and not is_sha256(root):
        raise MessageError("bad_request", "root is not 64 lowercase hex digits")
    return root


def _optional_key(message: dict, chunk_size: int) -> bytes | None:
    """The requester's transfer key (§13): base64 of 32 bytes; its chunks are whole pieces."""
    key = message.get("key")
    if key is None:
        return None
    try:
        raw = wire.b64decode(key, "key")
    except Exception:
        raw = b""
    if len(raw) != 32:
        raise MessageError("bad_request", "key is not base64 of a 32-byte X25519 public key")
    if not is_e2e_chunk_size(chunk_size):
        raise MessageError("bad_request", "an end-to-end transfer's chunk_size is 256 KiB times a power of two, "
                                          "up to 4 MiB")
    return raw


def _transfer_ids(message: dict, field: str, most: int) -> tuple[str, ...]:
    """``exclude`` or ``avoid``: transfer ids, never circuits (the requester knows no more)."""
    ids = message.get(field)
    if ids is None:
        return ()
    if not isinstance(ids, list) or len(ids) > most or not all(is_transfer_id(t) for t in ids):
        raise MessageError("bad_request", f"{field} must be a list of at most {most} transfer ids")
    return tuple(ids)


def parse_request(message: dict) -> FileRequest:
    name = check_name(message.get("file"))
    sha = _optional_sha256(message)
    chunk_size = _chunk_size(message)
    return FileRequest(name, sha, chunk_size, _chunks(message), _optional_root(message),
                       _optional_key(message, chunk_size), _transfer_ids(message, "exclude", MAX_EXCLUDED),
                       _transfer_ids(message, "avoid", MAX_AVOIDED))


def request_message(file: str, chunk_size: int, sha256: str | None = None, chunks: list | None = None, *,
                    root: str | None = None, key: bytes | None = None, exclude=(), avoid=()) -> dict:
    message = {"type": REQUEST, "file": file, "chunk_size": chunk_size}
    if sha256:
        message["sha256"] = sha256
    if root:
        message["root"] = root
    if chunks is not None:
        message["chunks"] = chunks
    if key is not None:
        message["key"] = wire.b64encode(key)
    if exclude:
        message["exclude"] = list(exclude)
    if avoid:
        message["avoid"] = list(avoid)
    return message


# --- request: the tracker's, to the sharing circuit (it names the transfer) ----------------

@dataclass(frozen=True, slots=True)
class SourceRequest:
    file: str
    transfer: str
    chunk_size: int
    sha256: str | None
    chunks: list | None
    root: str | None = None
    key: bytes | None = None  # the requester's key: this transfer is end-to-end (§13)


def parse_source_request(message: dict) -> SourceRequest:
    """What a sharer is asked to send, checked as the tracker checks a ``request``."""
    transfer = _transfer_id(message)
    name = check_name(message.get("file"))
    sha = _optional_sha256(message)
    chunk_size = _chunk_size(message)
    key = _optional_key(message, chunk_size)
    root = _optional_root(message)
    if key is not None and root is None:
        raise MessageError("bad_request", "an end-to-end request names the root")
    return SourceRequest(name, transfer, chunk_size, sha, _chunks(message), root, key)


def source_request_message(request: FileRequest, transfer: str, sha256: str | None,
                           root: str | None = None, e2e: bool = False) -> dict:
    """The tracker's ``request`` to the sharer: the requester's, with the transfer
    id, the sha256 (and root) of the entry chosen, and the requester's key when
    the transfer is end-to-end."""
    message = {"type": REQUEST, "file": request.file, "transfer": transfer,
               "chunk_size": request.chunk_size, "sha256": sha256}
    if root is not None:
        message["root"] = root
    if request.chunks is not None:
        message["chunks"] = request.chunks
    if e2e:
        message["key"] = wire.b64encode(request.key)
    return message


# --- transfer: the tracker's answer once the bridge is ready --------------------------------

@dataclass(frozen=True, slots=True)
class Transfer:
    transfer: str
    file: str
    size: int | None
    sha256: str | None
    chunk_size: int
    root: str | None = None
    e2e: bool = False


def parse_transfer(message: dict) -> Transfer:
    transfer = _transfer_id(message)
    name = check_name(message.get("file"))
    size = message.get("size")
    if size is not None and not _is_size(size):
        raise MessageError("bad_request", "transfer: size is not a non-negative integer")
    e2e = message.get("e2e", False)
    if not isinstance(e2e, bool):
        raise MessageError("bad_request", "transfer: e2e is not a boolean")
    root = _optional_root(message)
    if e2e and (root is None or size is None):
        raise MessageError("bad_request", "transfer: an end-to-end transfer names its root and size")
    return Transfer(transfer, name, size, _optional_sha256(message), _chunk_size(message), root, e2e)


def transfer_message(transfer: str, file: str, size: int | None, sha256: str | None, chunk_size: int,
                     root: str | None = None, e2e: bool = False) -> dict:
    message = {"type": TRANSFER, "transfer": transfer, "file": file, "size": size, "sha256": sha256,
               "chunk_size": chunk_size}
    if root is not None:
        message["root"] = root
    if e2e:  # absent: §8's transfer, as a /1 tracker answers
        message["e2e"] = True
    return message


# --- error -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ErrorReply:
    error: str
    detail: str | None


def parse_error(message: dict) -> ErrorReply:
    error, detail = message.get("error"), message.get("detail")
    if not isinstance(error, str) or not error:
        raise MessageError("bad_request", "error: error is not a non-empty string")
    if detail is not None and not isinstance(detail, str):
        raise MessageError("bad_request", "error: detail is not a string")
    return ErrorReply(error, detail)


def error_message(error: str, detail: str) -> dict:
    return {"type": ERROR, "error": error, "detail": detail}


#: The answer to a chunk no bridge carries (§8): the tracker's, and a /2 exit's (docs 17.10, choice 59).
NO_BRIDGE_DETAIL = "no bridge for this transfer: chunks go to the requester's exit"
