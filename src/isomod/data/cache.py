"""Where generated data sets are cached (written atomically, `isomod.files`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from isomod.files import write_atomic


def cache_dir() -> Path:
    """`$ISOMOD_CACHE`, else `~/.cache/isomod`."""
    root = os.environ.get("ISOMOD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "isomod")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
