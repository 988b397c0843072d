"""Errors a user can act on: each message is one line naming what was wrong."""

from dataclasses import fields


class IsomodError(Exception):
    """Bad input or state: a task, file, checkpoint or option the library cannot use."""


class CheckpointError(IsomodError):
    """A checkpoint that is missing, corrupt, or from an incompatible configuration."""


class TrainingDiverged(IsomodError):
    """The loss stopped being finite; the last good checkpoint is kept."""


def dataclass_from_dict(cls, data: dict, what: str):
    """`cls(**data)`, refusing unknown keys in one line that lists the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise IsomodError(f"unknown {what} keys {unknown}; known: {sorted(known)}")
    return cls(**data)
