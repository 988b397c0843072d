"""Errors a user can act on: each message is one line naming what was wrong."""


class IsomodError(Exception):
    """Bad input or state: a task, file, checkpoint or option the library cannot use."""


class CheckpointError(IsomodError):
    """A checkpoint that is missing, corrupt, or from an incompatible configuration."""


class TrainingDiverged(IsomodError):
    """The loss stopped being finite; the last good checkpoint is kept."""
