"""What the training loop reads: task-homogeneous batches (epoch-wise or drawn with
replacement, resuming exactly), the random shifts of augmentation, and the evaluation of
accuracy per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from isomod import distributed
from isomod.data.tasks import TaskData
from isomod.errors import IsomodError
from isomod.core.network import TaskModel, to_float


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2, part: slice | None = None,
                 total: int | None = None) -> torch.Tensor:
    """Shift each image by up to `max_shift` whole pixels, filling with zeros.

    Shifts are drawn for a batch of `total` images (default: `x`'s), of which `x` holds the
    `part`: every data-parallel rank draws the same shifts and applies its own share.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    total, part = total or b, part or slice(0, b)
    dx = torch.randint(0, 2 * max_shift + 1, (total,), generator=g)[part]
    dy = torch.randint(0, 2 * max_shift + 1, (total,), generator=g)[part]
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (B, W)
    idx = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


HELD_SHARE = 0.25  # of the device's free memory, at most, holds training images


def held_on_device(tasks: dict[str, TaskData], device: torch.device | None) -> dict:
    """On a CUDA device, the training images and labels of the tasks that fit in a quarter of
    its free memory, copied there once (a batch is then gathered on the device); none on the
    CPU, and none of a lazily read folder."""
    if device is None or torch.device(device).type != "cuda":
        return {}
    budget, held = torch.cuda.mem_get_info(device)[0] * HELD_SHARE, {}
    for name, data in tasks.items():
        if not isinstance(data.x_train, torch.Tensor):
            continue
        size = data.x_train.numel() * data.x_train.element_size()
        if size <= budget:
            held[name] = (data.x_train.to(device), data.y_train.to(device))
            budget -= size
    return held


class TaskDraws:
    """Which tasks each step trains, drawn from the run's generator a log interval at a time
    (one read of the drawn indices per interval, none in between), and the generator's state
    as if it had drawn one step at a time (what a checkpoint saves and a resume restores)."""

    def __init__(self, g: torch.Generator, weights: torch.Tensor, k: int):
        self.g, self.weights, self.k = g, weights, k
        self.start = g.get_state()  # the state before the current chunk
        self.chunk: list[list[int]] = []
        self.used = 0

    def refill(self, steps: int) -> None:
        """Draw the next `steps` steps' tasks (the chunk still unused is dropped, as the state
        it left behind)."""
        self.g.set_state(self.state())
        self.start = self.g.get_state()
        draws = torch.stack([torch.multinomial(self.weights, self.k, replacement=False, generator=self.g)
                             for _ in range(max(1, steps))])
        self.chunk, self.used = draws.tolist(), 0

    def next(self) -> list[int]:
        if self.used >= len(self.chunk):
            self.refill(1)
        self.used += 1
        return self.chunk[self.used - 1]

    def state(self) -> torch.Tensor:
        """The generator's state after the draws used so far."""
        replay = torch.Generator()
        replay.set_state(self.start)
        for _ in range(self.used):
            torch.multinomial(self.weights, self.k, replacement=False, generator=replay)
        return replay.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.g.set_state(state)
        self.start, self.chunk, self.used = state, [], 0


class Batches:
    """Task-homogeneous batches, epoch-wise shuffled (or drawn with replacement), from one
    generator whose state resumes exactly; also what an objective draws beside them.

    Every data-parallel rank draws the same global batch and loads only its share. A task
    read lazily from a folder (`ImageFiles`) has its next batch decoded in the background
    while the step runs, whenever that batch is already known (within an epoch), and in
    pinned memory on a GPU.
    """

    def __init__(self, tasks: dict[str, TaskData], batch_size: int, seed: int, order: str = "epochs",
                 device: torch.device | None = None):
        self.tasks = tasks
        self.batch_size = batch_size
        self.random = order == "random"
        self.device = device
        self.g = torch.Generator().manual_seed(seed)
        self.order: dict[str, torch.Tensor] = {}
        self.cursor: dict[str, int] = {}
        self.held = held_on_device(tasks, device)  # tasks whose images live on the device
        for data in tasks.values():
            if hasattr(data.x_train, "prefetch"):
                data.x_train.pin = device is not None and torch.device(device).type == "cuda"

    def next(self, task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's share of the next batch of `task`, and the global batch size."""
        data = self.tasks[task]
        n = len(data.y_train)
        if n == 0:
            raise IsomodError(f"task {task!r} has no training images")
        x_all, y_all = self.held.get(task, (data.x_train, data.y_train))
        if self.random:
            idx_t = torch.randint(n, (self.batch_size,), generator=self.g)[distributed.shard(self.batch_size)]
            return x_all[idx_t.to(y_all.device)], y_all[idx_t.to(y_all.device)], self.batch_size
        parts, size = [], min(self.batch_size, n)  # index tensors: no value is read back
        while sum(len(p) for p in parts) < size:
            if task not in self.order or self.cursor[task] >= n:
                self.order[task] = torch.randperm(n, generator=self.g)
                self.cursor[task] = 0
            take = min(size - sum(len(p) for p in parts), n - self.cursor[task])
            parts.append(self.order[task][self.cursor[task] : self.cursor[task] + take])
            self.cursor[task] += take
        idx_t = torch.cat(parts)[distributed.shard(size)].to(y_all.device)
        if hasattr(x_all, "prefetch") and self.cursor[task] + size <= n:  # the next batch is known: read ahead
            x_all.prefetch(self.order[task][self.cursor[task] : self.cursor[task] + size][distributed.shard(size)])
        return x_all[idx_t], y_all[idx_t], size

    def indices(self, n: int, size: int) -> torch.Tensor:
        return torch.randint(n, (size,), generator=self.g)[distributed.shard(size)]

    def draw(self, task: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if task not in self.tasks:
            raise IsomodError(f"an objective asked for images of {task!r}, which this run was not given; "
                              f"it has: {', '.join(self.tasks)}")
        data = self.tasks[task]
        idx = self.indices(len(data.y_train), size)
        return to_float(data.x_train[idx].to(self.device)), data.y_train[idx].to(self.device)

    def state_dict(self) -> dict:
        return {"g": self.g.get_state(), "order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["g"])
        self.order, self.cursor = dict(state["order"]), dict(state["cursor"])


@torch.no_grad()
def evaluate(model: TaskModel, tasks: dict[str, TaskData] | list[TaskData], split: str = "test",
             batch_size: int = 500) -> dict[str, float]:
    """Accuracy per task on `split` (`test` or `train`), in eval mode; data-parallel
    ranks each evaluate a share of the images and add up their counts."""
    if isinstance(tasks, list):
        tasks = {t.name: t for t in tasks}
    device = next(model.parameters()).device
    out = {}
    with model.evaluating():
        for name, data in tasks.items():
            x_all, y_all = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            part = distributed.shard(len(y_all))
            correct = 0
            for i in range(part.start, part.stop, batch_size):
                j = min(i + batch_size, part.stop)
                if hasattr(x_all, "prefetch") and j < part.stop:  # a folder read lazily: the next slice ahead
                    x_all.prefetch(slice(j, min(j + batch_size, part.stop)))
                x = to_float(x_all[i:j].to(device))
                correct += (model(x, name).argmax(-1).cpu() == y_all[i:j]).sum().item()
            correct = distributed.all_sum(torch.tensor([float(correct)], device=device)).item()
            out[name] = correct / max(1, len(y_all))
    return out
