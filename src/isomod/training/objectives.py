"""What a training run minimises: an *objective*, given to the one `Trainer`.

An objective is a small `nn.Module`. Its `forward(model, batch)` returns an `Output`: the
loss, the logits of the batch's task (for running accuracy; None when it has none) and
named metrics (numbers or tensors the trainer logs). It may own parameters (a domain discriminator:
the trainer optimises them under the role `objective`, saves them in its checkpoint and
averages their gradients over data-parallel processes) and may ask for more images than
the batch holds through `batch.draw` (the labelled sources of domain adaptation).

A plain function `(model, x, y, task) -> (loss, logits)` is an objective too
(`as_objective` wraps it); `cross_entropy` is the supervised one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


class Draw(Protocol):
    """What an objective may draw besides its batch (`batch.extra`), from the run's own generator."""

    def draw(self, task: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` images (floats in [0, 1], on the run's device) and labels of `task`,
        drawn with replacement (this process's share under data parallelism)."""

    def indices(self, n: int, size: int) -> torch.Tensor:
        """`size` indices into `0..n-1`, drawn with replacement (this process's share)."""


@dataclass
class Batch:
    """One batch of one task: images `x` `(B, C, H, W)` in [0, 1] and labels `y` `(B,)`
    (-1 for unlabelled images); `progress` is the fraction of the run done before it."""

    task: str
    x: torch.Tensor
    y: torch.Tensor
    progress: float
    extra: Draw  # what the objective may draw besides this batch


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: `forward(model, batch) -> Output`."""

    def forward(self, model, batch: Batch) -> Output:
        raise NotImplementedError


def cross_entropy(model, x: torch.Tensor, y: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised objective: mean cross-entropy of the task's head."""
    logits = model(x, task)  # (B, K)
    return F.cross_entropy(logits, y), logits


class FunctionObjective(Objective):
    """A plain function `(model, x, y, task) -> (loss, logits)` as an objective."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, model, batch: Batch) -> Output:
        loss, logits = self.fn(model, batch.x, batch.y, batch.task)
        return Output(loss, logits)


def as_objective(objective: Objective | Callable) -> Objective:
    return objective if isinstance(objective, Objective) else FunctionObjective(objective)
