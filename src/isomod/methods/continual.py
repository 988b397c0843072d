"""Continual learning by growing the pool: tasks arrive one by one; each reuses the frozen
pool through a new route or, when a route alone falls short of a threshold, adds `k` fresh
modules trained for it while every older module stays frozen.

Earlier tasks keep their exact outputs: their routes are discrete, their norms and heads
frozen, and the modules they use never change again. Routes never pick modules added
after them (`Route.add_modules`), so growing the pool leaves them bit-identical.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from isomod.methods.transfer import ROUTE_BIAS, fit_route, select_source
from isomod.io.checkpoint import save_checkpoint
from isomod.data.tasks import TaskData, split_validation
from isomod.errors import IsomodError
from isomod.core.network import ModularNet
from isomod.training.trainer import TrainConfig, Trainer, evaluate


@dataclass
class GrowConfig:
    """When and how the pool grows.

    Args:
        threshold: validation accuracy a route over the frozen pool must reach; below
            it the task gets fresh modules.
        modules: modules added for such a task (the `k` of "add k modules").
        val_fraction: share of each class's training images held out for that decision.
        route_lr: learning rate of the run over the frozen pool (route, norms and head:
            a few thousand numbers on frozen features take a far larger rate than modules).
    """

    threshold: float = 0.9
    modules: int = 2
    val_fraction: float = 0.1
    route_lr: float = 5e-2

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise IsomodError(f"grow threshold must lie in [0, 1], got {self.threshold}")
        if self.modules < 1:
            raise IsomodError(f"growing must add at least 1 module, got {self.modules}")
        if self.route_lr <= 0:
            raise IsomodError(f"route_lr must be positive, got {self.route_lr}")
        if not 0.0 < self.val_fraction < 1.0:
            raise IsomodError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")


@dataclass
class TaskOutcome:
    """What learning one task of the stream did."""

    task: str
    grew: bool
    modules_added: int
    val_route: float | None  # validation accuracy of the route over the frozen pool
    val_grown: float | None  # ... and after growing (None when the pool did not grow)
    test_acc: float
    steps: int  # optimiser steps spent on the task
    route: list[int]


def _grown_route_start(model: ModularNet, task: str, previous: torch.Tensor | list[int], new: list[int]) -> None:
    # Each step starts tied between what the frozen-pool route chose and every fresh
    # module, so the fresh ones are trained wherever they help. A discrete choice gets a
    # strong bias (the many other modules of a grown pool must not dilute the start); a
    # soft route keeps its logits, the fresh modules tied with its largest.
    route = model.route(task)
    if isinstance(previous, torch.Tensor):  # (L, N_before) logits of a soft route
        logits = torch.zeros_like(route.logits)
        logits[:, : previous.shape[1]] = previous
        logits[:, new] = previous.max(1, keepdim=True).values
        route.set_logits(logits)
    else:
        route.start_at((previous, ROUTE_BIAS), *(([m] * route.steps, ROUTE_BIAS) for m in new))


def learn_task(model: ModularNet, task: TaskData, config: TrainConfig, grow: GrowConfig = GrowConfig(),
               out_dir: str | Path | None = None, progress: bool = True) -> TaskOutcome:
    """Add the next task of a stream to `model`.

    The first task trains stem, pool, route, norms and head. Every later one first learns
    a route over the frozen pool (`fit_route`, starting from the norms and route of the task
    `select_source` picks, at `grow.route_lr`); when its validation accuracy is below
    `grow.threshold`, `grow.modules` fresh modules join the pool and are trained with a new
    route, norms and head; that run is kept only when validation accuracy improves, and
    then only with the fresh modules its route uses (a discrete route; a soft one weights
    them all). At the end everything is frozen, so no later task can change this one.

    Args:
        model: the model of the stream so far (possibly without tasks).
        task: the new task.
        config: the budget of each training run (a grown task runs two).
        grow: threshold and growth size.
        out_dir: folder for the task's checkpoint and logs (None: nothing written).
        progress: show progress bars.
    """
    name = task.name
    run_dir = Path(out_dir) if out_dir is not None else None
    if not model.task_names:
        model.add_task(task.spec)
        acc = Trainer(model, [task], config, out_dir=run_dir, progress=progress).fit()[name]
        model.requires_grad_(False)  # no later task changes what this one computes
        return TaskOutcome(name, True, len(model.pool), None, None, acc, config.steps, model.route(name).indices())
    fit = split_validation(task, grow.val_fraction, seed=config.seed)
    source = select_source(model, fit, seed=config.seed)[0]
    route_config = replace(config, lr=grow.route_lr, lr_heads=grow.route_lr, lr_routes=grow.route_lr)
    val_route = fit_route(model, fit, route_config, source=source, progress=progress)[name]
    outcome = TaskOutcome(name, False, 0, val_route, None, 0.0, config.steps, model.route(name).indices())
    if val_route < grow.threshold:
        _try_growing(model, task, fit, config, grow, outcome, progress)
    model.requires_grad_(False)  # no later task changes what this one computes
    outcome.test_acc = evaluate(model, {name: task})[name]
    if run_dir is not None:
        save_checkpoint(model, run_dir / "checkpoint")
    return outcome


def _try_growing(model: ModularNet, task: TaskData, fit: TaskData, config: TrainConfig, grow: GrowConfig,
                 outcome: TaskOutcome, progress: bool) -> None:
    """Retrain `task` with `grow.modules` fresh modules; keep the run (and the fresh modules
    its route uses) only when its validation accuracy beats the frozen-pool route's."""
    name = task.name
    saved = copy.deepcopy(model.branch(name).state_dict())
    soft = not model.route(name).is_discrete
    model.remove_task(name)
    new = model.add_modules(grow.modules)
    branch = model.add_task(task.spec)
    # Norms and head start from what the frozen-pool run learned; the route is new.
    branch.load_state_dict({k: v for k, v in saved.items() if not k.startswith("route.")}, strict=False)
    _grown_route_start(model, name, saved["route.logits"] if soft else outcome.route, new)
    params = {**model.param_groups([name]), "pool": [p for i in new for p in model.pool.blocks[i].parameters()]}
    trainer = Trainer(model, {name: fit}, replace(config, lr_heads=grow.route_lr), progress=progress,
                      train_tasks=[name], params=params)
    outcome.val_grown = trainer.fit()[name]
    outcome.steps += config.steps
    if outcome.val_grown > outcome.val_route:
        # Keep the run, but only the fresh modules its discrete route uses: removing
        # the others changes nothing the task computes.
        used = model.route(name).indices() if model.route(name).is_discrete else new
        unused = [i for i in new if i not in used]
        for index in reversed(unused):
            model.remove_module(index)
        outcome.modules_added = len(new) - len(unused)
        outcome.grew, outcome.route = outcome.modules_added > 0, model.route(name).indices()
    else:  # growing did not help: back to the frozen-pool route, the fresh modules go
        model.remove_task(name)
        for index in reversed(new):
            model.remove_module(index)
        model.add_task(task.spec).load_state_dict(saved)
