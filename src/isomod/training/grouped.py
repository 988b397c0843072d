"""All the tasks of a training step in one forward pass (`TrainConfig.group_tasks`).

A step of `T` tasks otherwise runs `T` forward passes, one per task, each of them `L` blocks
of small convolutions: on a GPU, thousands of kernel launches for little arithmetic. Here
the `T` batches (equal sizes) run side by side as channel groups, a batch of `B` images with
`T x C` channels:

- the stem runs once on the `T x B` images;
- at each step every task's weights are mixed by its route in one product over the stacked
  pool, `(T, C, C, k, k)`, and applied as one convolution with `groups=T`;
- each task's norm of a step is one batch norm over the `T x C` channels (its statistics
  are per channel, so per task, as the task's own norm computes them); the tasks' running
  statistics are held stacked while the run trains and written back to their norms before
  anything reads them (`write_back`);
- the heads (class counts differ between tasks) run one per task.

The numbers are those of the per-task loop up to float rounding (a discrete route mixes
with a one-hot weight, which gives its module's weights exactly); a test trains both ways
and compares them.
"""

from __future__ import annotations

import torch

from isomod import distributed
from isomod.core.blocks import KINDS, ResidualModule
from isomod.core.network import TaskModel, mix
from isomod.errors import IsomodError


def grouped_refusal(model: TaskModel, tasks: dict, train_tasks: list[str], batch_size: int) -> str | None:
    """Why the tasks `train_tasks` of `model` cannot train as one grouped forward pass (None
    when they can): what the grouped step runs is a modular network of convolution blocks
    with weight mixing, every task's batch of one size, each step norm a batch norm with a
    momentum, in training mode."""
    config = getattr(model, "config", None)
    if not getattr(model, "has_routes", False) or config is None:
        return f"a {type(model).__name__} has no routes to group"
    if not KINDS[config.block].groups_tasks or config.mixing != "weight":
        return (f"it runs convolution blocks with weight mixing, not block {config.block!r} with "
                f"mixing {config.mixing!r}")
    sizes = {name: min(batch_size, len(tasks[name].y_train)) for name in train_tasks}
    if len(set(sizes.values())) > 1:
        return f"every task's batch must have one size; these are {sizes}"
    for name in train_tasks:
        for norm in model.branch(name).norms:
            if not norm.training:
                return f"task {name!r} keeps some norm statistics fixed (eval mode)"
            if norm.momentum is None or not norm.track_running_stats:
                return f"task {name!r} has a norm without a momentum for its running statistics"
    return None


class GroupedForward:
    """The grouped forward pass of `tasks` (a modular network's, see `grouped_refusal`),
    holding their norms' running statistics stacked `(2L + 1, T_all, C)` from construction
    until `write_back`."""

    def __init__(self, model, tasks: list[str]):
        self.model, self.tasks = model, list(tasks)
        self.index = {name: i for i, name in enumerate(self.tasks)}
        branches = [model.branch(name) for name in self.tasks]
        self.positions = len(branches[0].norms)  # 2L + 1
        with torch.no_grad():
            self.mean = torch.stack([torch.stack([b.norms[j].running_mean for b in branches])
                                     for j in range(self.positions)])  # (2L + 1, T_all, C)
            self.var = torch.stack([torch.stack([b.norms[j].running_var for b in branches])
                                    for j in range(self.positions)])
        self.tracked = [0] * len(self.tasks)  # batches each task's norms saw since the last write-back
        self._rows: dict[tuple[str, ...], torch.Tensor | None] = {}

    def _rows_of(self, names: tuple[str, ...]) -> torch.Tensor | None:
        """The stacked rows of `names` as an index tensor; None when they are all the tasks
        in order (the stacks are then used in place)."""
        if names not in self._rows:
            idx = [self.index[n] for n in names]
            self._rows[names] = None if idx == list(range(len(self.tasks))) else torch.tensor(
                idx, device=self.mean.device)
        return self._rows[names]

    def features(self, xs: list[torch.Tensor], names: list[str]) -> torch.Tensor:
        """Pooled features `(T, B, C)` of the batches `xs` (each `(B, C_in, H, W)`), batch `t`
        under task `names[t]`."""
        model, t = self.model, len(names)
        sizes = {len(x) for x in xs}
        if len(sizes) != 1 or len(xs) != t:
            raise IsomodError(f"a grouped step needs one batch of one size per task; got {len(xs)} batches of sizes "
                              f"{sorted(sizes)} for {t} tasks")
        rows = self._rows_of(tuple(names))
        for name in names:
            self.tracked[self.index[name]] += 1
        branches = [model.branch(n) for n in names]
        b = sizes.pop()
        h = model.stem(torch.cat(xs))  # (T B, C, H, W)
        c, size = h.shape[1], h.shape[2:]
        h = h.view(t, b, c, *size).transpose(0, 1).reshape(b, t * c, *size)  # (B, T C, H, W)
        mixed = mix(torch.stack([br.route.weights() for br in branches], 1), model.pool.stacked())  # (L, T, ...)
        # One step's T blocks side by side: weights (T C, C, k, k), module-owned affine (T C,)
        steps = [{name: w.flatten(0, 1) for name, w in zip(mixed, ws)}
                 for ws in zip(*(m.unbind(0) for m in mixed.values()))]
        for l, p in enumerate(steps):
            h = ResidualModule.run(h, p, lambda z, j=2 * l: self.norm(z, j, branches, rows),
                                   lambda z, j=2 * l + 1: self.norm(z, j, branches, rows), groups=t)
        h = KINDS[model.config.block].features(self.norm(h, self.positions - 1, branches, rows))  # (B, T C)
        return h.view(b, t, c).transpose(0, 1)  # (T, B, C)

    def __call__(self, xs: list[torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        """Each task's logits `(B, K_t)` of its batch."""
        features = self.features(xs, names)
        return [self.model.forward_head(f, n) for f, n in zip(features.unbind(0), names)]

    def norm(self, h: torch.Tensor, j: int, branches: list, rows: torch.Tensor | None) -> torch.Tensor:
        """The tasks' norms at position `j` on `h` `(B, T C, H, W)`: batch statistics per
        channel, running statistics updated in the stacks, each task's own affine parameters
        (where its step norms have them)."""
        first = branches[0].norms[j]
        if rows is None:
            mean, var = self.mean[j].view(-1), self.var[j].view(-1)  # views: updated in place
        else:
            mean, var = self.mean[j].index_select(0, rows).view(-1), self.var[j].index_select(0, rows).view(-1)
        weight = bias = None
        if first.weight is not None:
            weight = torch.cat([br.norms[j].weight for br in branches])
            bias = torch.cat([br.norms[j].bias for br in branches])
        out = distributed.global_batch_norm(h, mean, var, weight, bias, first.momentum, first.eps)
        if rows is not None:
            with torch.no_grad():
                t = len(branches)
                self.mean[j].index_copy_(0, rows, mean.view(t, -1))
                self.var[j].index_copy_(0, rows, var.view(t, -1))
        return out

    @torch.no_grad()
    def write_back(self) -> None:
        """Each task's norms get their running statistics (and batch counts) back from the
        stacks."""
        for i, name in enumerate(self.tasks):
            norms = self.model.branch(name).norms
            for j in range(self.positions):
                norms[j].running_mean.copy_(self.mean[j, i])
                norms[j].running_var.copy_(self.var[j, i])
                norms[j].num_batches_tracked += self.tracked[i]
            self.tracked[i] = 0
