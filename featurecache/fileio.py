"""Small file helpers shared by every stage: atomic writes and file digests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place.

    Readers see the old file or the new one, never a partial one; the temporary is removed on any error.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_for(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_for(path: Path, pid: int | str | None = None) -> Path:
    """The hidden name a file is written under before it is renamed into place: the writer's process id is in it,
    so a temporary whose process is gone can be told from one being written (``pid="*"``: the glob of all)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def file_sha256(path: Path, *, length: int | None = None) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks; ``length`` truncates it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def writable(folder: Path) -> bool:
    """Whether ``folder`` can be written to (or made): the nearest existing folder on its path admits a write. A
    read-only mount says no here, before any lock or temporary file is attempted."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing is not None and existing.is_dir() and os.access(existing, os.W_OK)
