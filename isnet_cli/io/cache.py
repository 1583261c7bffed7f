"""On-disk cache of decoded + resized arrays, keyed by file content and preprocessing settings.

key = sha256(settings JSON, sha256(image bytes), sha256(mask bytes)): editing a file or changing
the size/resize/window settings misses the cache; renaming or moving a file does not.
Entries are .npz files written atomically (temp file + rename), so parallel workers and killed runs
never leave a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.io.atomic import atomic_write_bytes

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes, memoised per (path, size, mtime) within the process."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def cache_key(image: str | Path, mask: str | Path | None, settings: dict[str, Any]) -> str:
    """Content- and settings-derived key (hex)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(file_digest(image).encode())
    h.update(b"-" if mask is None else file_digest(mask).encode())
    return h.hexdigest()


class ArrayCache:
    """A folder of `<key>.npz` files holding named arrays."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The stored arrays, or None on a miss (or an unreadable entry, which is then recomputed)."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with np.load(p) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):
            return None

    def put(self, key: str, **arrays: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.path(key), buffer.getvalue(), durable=False)
