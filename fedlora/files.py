"""Files that are whole or absent: a crash (or another writer of the same
path) leaves the old content or the new one, never half of either."""

from __future__ import annotations

import io
import os
import uuid

import numpy as np


def write_atomic(path: str, data: bytes | str, mode: int | None = None) -> None:
    """Write a unique temporary file beside ``path``, fsync it, rename it over
    ``path``; on any failure the temporary file is removed and ``path`` kept.
    ``mode`` (e.g. 0o600, owner-only) is set before the rename: the file is never
    visible with wider permissions."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # unique per writer (not mkstemp: that would make the file 0600)
    try:
        with open(tmp, "xb") as f:
            if mode is not None:
                os.chmod(tmp, mode)
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_npz_atomic(path: str, arrays: dict[str, np.ndarray], mode: int | None = None) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue(), mode)
