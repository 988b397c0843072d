"""Errors a user can act on: each message is one line naming what was wrong."""

import os
from pathlib import Path


class IsomodError(Exception):
    """Bad input or state: a task, file, checkpoint or option the library cannot use."""


class CheckpointError(IsomodError):
    """A checkpoint that is missing, corrupt, or from an incompatible configuration."""


class TrainingDiverged(IsomodError):
    """The loss stopped being finite; the last good checkpoint is kept."""


class Interrupted(IsomodError):
    """A signal (SIGTERM, SIGINT) ended a run after the step in progress, which was saved."""

    def __init__(self, message: str, signum: int, checkpoint=None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


def check_choice(what: str, value, known) -> None:
    """Refuse `value` unless it is one of `known`, in one line that lists them."""
    if value not in known:
        raise IsomodError(f"unknown {what} {value!r}; known: {', '.join(known)}")


def check_choices(what: str, values, known) -> None:
    """`check_choice` for each of `values`."""
    for value in values:
        check_choice(what, value, known)


def check_out_dir(path: Path) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written."""
    if path.exists() and not path.is_dir():
        raise IsomodError(f"--out {path}: exists and is not a folder; give a new or existing folder")
    parent = next((p for p in [path, *path.parents] if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK) or not parent.is_dir():
        raise IsomodError(f"--out {path}: cannot create or write there; give a writable folder")
    if str(path.resolve()).startswith(("/proc/", "/sys/")):
        raise IsomodError(f"--out {path}: not a writable folder (a kernel file system); give a writable folder")


def check_out_file(path: Path) -> None:
    """Refuse, before any work, an output file that is a folder or cannot be written."""
    if path.is_dir():
        raise IsomodError(f"--out {path}: is a folder; give a file name")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) \
            or str(parent.resolve()).startswith(("/proc", "/sys")):
        raise IsomodError(f"--out {path}: cannot write there; give a file in a writable folder")
