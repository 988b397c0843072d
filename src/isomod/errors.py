"""Errors a user can act on: each message is one line naming what was wrong."""


class IsomodError(Exception):
    """Bad input or state: a task, file, checkpoint or option the library cannot use."""


class CheckpointError(IsomodError):
    """A checkpoint that is missing, corrupt, or from an incompatible configuration."""


class TrainingDiverged(IsomodError):
    """The loss stopped being finite; the last good checkpoint is kept."""


def check_choice(what: str, value, known) -> None:
    """Refuse `value` unless it is one of `known`, in one line that lists them."""
    if value not in known:
        raise IsomodError(f"unknown {what} {value!r}; known: {', '.join(known)}")


def check_choices(what: str, values, known) -> None:
    """`check_choice` for each of `values`."""
    for value in values:
        check_choice(what, value, known)
