"""The `isomod` command (`main`) and its model commands (`model`)."""

from isomod.cli.main import main

__all__ = ["main"]
