"""Route-only learning: a new task reuses a trained pool by learning only its route, the
norms of its steps and its head; pool, stem and every other task stay as they were."""

from __future__ import annotations

from pathlib import Path

import torch

from isomod.data.tasks import TaskData
from isomod.errors import IsomodError
from isomod.network import ModularNet
from isomod.train import TrainConfig, Trainer

TRANSFER_TRAIN = TrainConfig(steps=600, batch_size=128, lr=5e-3, lr_heads=5e-3, warmup_steps=20,
                             checkpoint_every=0, log_every=20)


def few_shot(task: TaskData, shots: int | None, seed: int = 0) -> TaskData:
    """The task with only `shots` training images per class (all of them when None)."""
    if shots is None:
        return task
    counts = torch.bincount(task.y_train, minlength=task.spec.num_classes)
    smallest = int(counts.min())
    if shots < 1 or shots > smallest:
        raise IsomodError(
            f"--shots {shots} is outside 1..{smallest}: the smallest class of task {task.name!r} "
            f"has {smallest} training images"
        )
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(task.y_train == c).flatten()[torch.randperm(int(n), generator=g)[:shots]]
                     for c, n in enumerate(counts.tolist())])
    idx = idx.sort().values
    return TaskData(task.spec, task.x_train[idx], task.y_train[idx], task.x_test, task.y_test)


def fit_route(model: ModularNet, task: TaskData, config: TrainConfig = TRANSFER_TRAIN,
              out_dir: str | Path | None = None, init_from: str | None = None,
              progress: bool = True) -> dict[str, float]:
    """Add `task` to a trained model (unless already added) and learn only its route,
    step norms and head; returns its test accuracy.

    Args:
        model: a trained ModularNet; its pool, stem and other tasks are frozen for good.
        task: the new task's data.
        config: budget and schedule of the route-only training.
        out_dir: run folder; its checkpoint serves every earlier task unchanged.
        init_from: an existing task whose step norms the new task starts from.
        progress: show a progress bar.
    """
    if not isinstance(model, ModularNet):
        raise IsomodError(f"route-only transfer needs a ModularNet, got {type(model).__name__}")
    if init_from is not None:
        model.check_task(init_from)
    if task.name not in model.specs:
        model.add_task(task.spec, copy_norms_from=init_from)
    elif model.specs[task.name].num_classes != task.spec.num_classes:
        raise IsomodError(f"task {task.name!r} exists with {model.specs[task.name].num_classes} classes, "
                          f"the data has {task.spec.num_classes}")
    model.requires_grad_(False)
    branch = model.branch(task.name)
    branch.norms.requires_grad_(True)
    branch.head.requires_grad_(True)
    branch.route.logits.requires_grad_(not branch.route.is_discrete)
    trainer = Trainer(model, {task.name: task}, config, out_dir=out_dir, progress=progress,
                      train_tasks=[task.name])
    return trainer.fit()
