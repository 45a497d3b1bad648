"""Small file helpers every writer shares: atomic writes (temp file in the same folder, then
rename, so no reader ever sees half a file) and content hashes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


NOTES_MARKER = "<!-- notes: written by hand, kept when the tool rewrites this file -->"
"""Where a tool-written doc's hand-written part starts (see :func:`kept_notes`)."""


def kept_notes(path: str | os.PathLike[str]) -> str:
    """The hand-written part of an earlier doc: everything from :data:`NOTES_MARKER` on ('' if none)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return ""
    return text[text.index(NOTES_MARKER) :] if NOTES_MARKER in text else ""


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
