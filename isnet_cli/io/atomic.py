"""Atomic file writes: every file isnet writes (checkpoints, run-folder files, reports, cache entries)
goes through `atomic_write_bytes`, so a killed process never leaves half a file behind."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from isnet_cli.errors import IsnetError

# Write failures that are the disk's, not a bug: reported on one line, the previous file left as it was.
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write via a temp file in the same folder + rename. `durable`: fsync before the rename (a cache
    entry, recomputed when lost, skips it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions an ordinary open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _FULL:
            kept = "the previous version is intact" if path.exists() else "nothing was written"
            raise IsnetError(
                f"{path}: cannot write {len(data):,} bytes ({os.strerror(exc.errno)}); {kept}; "
                "free disk space (or raise the quota / file-size limit) and run again"
            ) from None
        raise
