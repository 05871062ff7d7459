"""The peer's page: the files under ``static/`` it may serve, and who the page names.

Only the files in ``STATIC_TYPES`` are ever read (no path from a request
reaches the disk otherwise). ``index.html``'s title and heading name the
peer: its ``name`` key, if set, and its address, so a user with several
peers' pages open knows which is which.
"""

from __future__ import annotations

import html
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
    "favicon.png": b"image/png",
}
PAGE_CSP = (b"default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
            b"object-src 'none'")


def static_file(name: str) -> tuple[bytes, bytes] | None:
    """(body, Content-Type) of the page file ``name``, or None if it is not one (or unreadable)."""
    kind = STATIC_TYPES.get(name)
    if kind is None:
        return None
    try:
        return (STATIC_DIR / name).read_bytes(), kind
    except OSError:
        return None


def named_page(body: bytes, name: str, address: str | None) -> bytes:
    """``index.html`` with the peer's name and address in its title and heading."""
    e = html.escape
    where = f"onion_twisted peer at {address}" if address else "onion_twisted peer"
    title = f"{name} · {where}" if name else where
    if name:
        heading = f'{e(name)} <span class="where">{e(where)}</span>'
    else:
        heading = e(where)
    body = body.replace(b"<title>onion_twisted peer</title>", f"<title>{e(title)}</title>".encode("utf-8"), 1)
    return body.replace(b'<h1 id="peer-heading">onion_twisted peer</h1>',
                        f'<h1 id="peer-heading">{heading}</h1>'.encode("utf-8"), 1)
