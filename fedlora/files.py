"""Files that are whole or absent: a crash (or a second process writing the
same path) leaves the old content or the new one, never half of either."""

from __future__ import annotations

import io
import os

import numpy as np


def write_atomic(path: str, data: bytes | str) -> None:
    """Write to a per-process temporary file, fsync it, then rename over ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())
