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


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it into place, so that
    readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        # mkstemp makes the file private (0600); give it the mode open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an `.npz` atomically (see `write_atomic`)."""
    write_atomic(path, lambda f: np.savez(f, **arrays))
