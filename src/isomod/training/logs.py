"""What a training run shows while it runs: the run log (JSON lines, and TensorBoard event
files when `tensorboard` is installed) and progress (a bar on a terminal, plain lines
when output goes to a file)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


class RunLog:
    """A run's log: one JSON object per line in `log.jsonl` and, when the `tensorboard`
    package is installed, TensorBoard event files in the same folder (scalars and the
    route matrices as images). Both are written by rank 0 only; `path` None writes nothing."""

    def __init__(self, path: Path | None):
        self.path = path
        self.board = None
        if path is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSON log is enough
                return
            self.board = SummaryWriter(str(path.parent), flush_secs=30)

    def write(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.board is not None:
            for tag, value in values.items():
                self.board.add_scalar(tag, value, step)

    def routes(self, step: int, usage: dict[str, torch.Tensor]) -> None:
        """Each task's route weights `(L, N)` as a grey image: steps down, modules across."""
        if self.board is not None:
            for task, w in usage.items():
                self.board.add_image(f"route/{task}", w.float().clamp(0, 1)[None], step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class Progress:
    """A progress bar on a terminal; elsewhere (output redirected to a file) one plain line
    every `every` of the run, so logs stay readable."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train", every: float = 0.05):
        self.total, self.step, self.enabled, self.desc = total, initial, enabled, desc
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc=desc, leave=True) if self.tty else None
        self.every = max(1, round(every * total))
        self.postfix = ""
        self.t0 = time.time()

    def update(self, n: int = 1) -> None:
        self.step += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.step % self.every == 0 or self.step == self.total):
            self.write(f"{self.desc}: step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%), "
                       f"{time.time() - self.t0:.0f} s  {self.postfix}".rstrip())

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
