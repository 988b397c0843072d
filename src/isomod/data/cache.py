"""Where generated data sets are cached, and how they are written (atomically)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np


def cache_dir() -> Path:
    """`$ISOMOD_CACHE`, else `~/.cache/isomod`."""
    root = os.environ.get("ISOMOD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "isomod")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def usual_mode(path: str | Path, base: int) -> None:
    """Give a file (`base` 0o666) or folder (0o777) made private by `mkstemp` / `mkdtemp`
    the mode `open()` or `mkdir()` would have given it under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, base & ~umask)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it into place, so that
    readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        usual_mode(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an `.npz` atomically (see `write_atomic`)."""
    write_atomic(path, lambda f: np.savez(f, **arrays))


def cached_npz(name: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays cached as `cache_dir() / name`; on a miss, `make()`'s, written atomically."""
    path = cache_dir() / name
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    arrays = make()
    save_npz_atomic(path, **arrays)
    return arrays
