"""Files written whole or not at all: a reader sees the old file or the new one, never half."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `write_atomic`)."""
    write_atomic(path, lambda f: f.write(text.encode()))
    return path
