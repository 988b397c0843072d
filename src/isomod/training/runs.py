"""A run folder belongs to one run: a lock while it is written, a refusal to start a new run
over an old one (unless asked to), and the options a resumed run may not change.

    with RunLock(out):          # a second writer of `out` gets a one-line error naming the first
        check_start(out, resume, force)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

from isomod.errors import IsomodError

LOCK = ".isomod.lock"
RUN_FILES = ("checkpoint", "log.jsonl", "train_config.json")
# Options a resumed run may change: what is written and shown, where it runs, and how (compiled,
# or tasks grouped: the same numbers up to float rounding).
FREE_OPTIONS = ("eval_every", "checkpoint_every", "log_every", "device", "compile", "compile_mode", "group_tasks")


_HELD: dict[Path, int] = {}  # folders this process holds, and how many times over


class RunLock:
    """An exclusive lock on a run folder for as long as the block runs (released by the
    operating system if the process dies); the lock file names its holder. A process may
    take a lock it already holds again (a command, then the trainer inside it)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.file = None
        self.nested = False

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        if _HELD.get(key):
            _HELD[key] += 1
            self.nested = True
            return self
        path = self.folder / LOCK
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise IsomodError(f"{self.folder} is in use by {holder}; wait for it to end, or give another folder") \
                from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()} ({' '.join(['isomod', *sys.argv[1:]])[:200]})")
        self.file.flush()
        _HELD[key] = 1
        return self

    def __exit__(self, *exc) -> None:
        key = self.folder.resolve()
        if key in _HELD:
            _HELD[key] -= 1
            if _HELD[key] == 0:
                del _HELD[key]
        if self.nested:
            return
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def check_start(folder: Path, resume: bool, force: bool) -> None:
    """Refuse to start a run over another one (`--resume` continues it, `--force` clears
    it first) and to resume where there is nothing to resume."""
    from isomod.io.checkpoint import checkpoint_exists

    if resume and force:
        raise IsomodError("--resume continues the run in the folder and --force starts it over: give one of them")
    if resume:
        if not checkpoint_exists(folder / "checkpoint"):
            raise IsomodError(f"--resume: no checkpoint in {folder} to resume from; run without --resume to start")
        return
    if not holds_run(folder):
        return
    if not force:
        raise IsomodError(f"{folder} holds a run already ({describe(folder)}); continue it with --resume, or start "
                          "over with --force or another --out")
    clear(folder)


def describe(folder: Path) -> str:
    config = folder / "checkpoint" / "config.json"
    try:
        step = json.loads(config.read_text()).get("extra", {}).get("step")
    except (OSError, ValueError):
        step = None
    return f"a checkpoint at step {step}" if step is not None else "its files"


def clear(folder: Path) -> None:
    """Remove what a run wrote in `folder` (checkpoint, log, TensorBoard events, config)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in list(folder.glob("events.out.tfevents.*")) + list(folder.glob(".checkpoint.*")):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_resumed_config(saved: dict, now: dict, extend: bool) -> str | None:
    """Refuse, in one line, a resumed run whose options change what it computes (anything
    but `FREE_OPTIONS`); a longer `steps` only with `extend`. Returns the line that states an
    extension, or None."""
    changed = sorted(k for k in set(saved) | set(now) if k not in FREE_OPTIONS and k != "steps"
                     and saved.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise IsomodError(f"--resume continues the run as it was set up; these options differ from it: {detail}. "
                          "Drop them, or start another run in another folder")
    old, new = saved.get("steps"), now.get("steps")
    if old == new:
        return None
    if not extend or new < old:
        raise IsomodError(f"--resume: the run was set up for {old} steps, not {new}; add --extend to continue it to "
                          f"a longer budget (its learning-rate schedule is recomputed over the new length)")
    return (f"extending the run from {old} to {new} steps: the learning-rate schedule is recomputed over {new} "
            "steps from where it stands")
