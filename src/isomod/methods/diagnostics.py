"""Does the route carry the task? Measurements on a trained multi-task model.

- `route_distance`: how different the tasks' routes are (mean pairwise total variation
  of the step weights: 0 for identical routes, 1 for routes that never share a module at
  any step).
- `cross_route_accuracy`: each task run with every task's route, keeping its own norms and
  head. A high diagonal and a low off-diagonal say routes are task-specific; this alone
  does not tell composition from modules locked to positions (both fail off the diagonal).
- `shuffled_accuracy`: each task with its own route's steps in a random other order (its
  norms stay at their steps). Modules that serve only one position score at chance.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from isomod.data.tasks import TaskData
from isomod.core.network import TaskModel
from isomod.training.trainer import evaluate


def route_distance(model: TaskModel, tasks: list[str] | None = None) -> float:
    """Mean over task pairs and steps of the total variation `0.5 * sum_n |w_a[l, n] - w_b[l, n]|`."""
    model.require_routes("route distance")
    usage = model.usage(tasks)
    names = list(usage)
    if len(names) < 2:
        return 0.0
    w = torch.stack([usage[n].double() for n in names])  # (T, L, N)
    tv = 0.5 * (w[:, None] - w[None]).abs().sum(-1).mean(-1)  # (T, T)
    pairs = torch.triu_indices(len(names), len(names), offset=1)
    return tv[pairs[0], pairs[1]].mean().item()


@contextmanager
def borrowed_route(model: TaskModel, task: str, state: dict):
    """Run `task` with another route's state (logits, temperature, choice) inside the block."""
    route = model.route(task)
    saved = {k: v.detach().clone() for k, v in route.state_dict().items()}
    grad = route.logits.requires_grad
    with torch.no_grad():
        route.load_state_dict(state)
    try:
        yield route
    finally:
        with torch.no_grad():
            route.load_state_dict(saved)
        route.logits.requires_grad_(grad)


def cross_route_accuracy(model: TaskModel, tasks: dict[str, TaskData]) -> tuple[list[str], torch.Tensor]:
    """`acc[a, b]`: test accuracy of task `a` run with task `b`'s route (own norms and head)."""
    model.require_routes("cross-route accuracy")
    names = list(tasks)
    acc = torch.zeros(len(names), len(names), dtype=torch.float64)
    for j, b in enumerate(names):
        state = {k: v.detach().clone() for k, v in model.route(b).state_dict().items()}
        for i, a in enumerate(names):
            with borrowed_route(model, a, state):
                acc[i, j] = evaluate(model, {a: tasks[a]})[a]
    return names, acc


def own_and_other(acc: torch.Tensor) -> tuple[float, float]:
    """The diagonal mean and the off-diagonal mean of a cross-route matrix."""
    n = acc.shape[0]
    own = acc.diagonal().mean().item()
    other = ((acc.sum() - acc.diagonal().sum()) / max(1, n * n - n)).item()
    return own, other


def shuffled_accuracy(model: TaskModel, tasks: dict[str, TaskData], seed: int = 0) -> dict[str, float]:
    """Each task's test accuracy with its route's steps in a random order other than its own."""
    model.require_routes("shuffled-route accuracy")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, data in tasks.items():
        route = model.route(name)
        steps = route.steps
        perm = torch.arange(steps)
        while steps > 1 and torch.equal(perm, torch.arange(steps)):
            perm = torch.randperm(steps, generator=g)
        state = {k: v.detach().clone() for k, v in route.state_dict().items()}
        state = {"logits": state["logits"][perm], "temperature": state["temperature"],
                 "choice": state["choice"][perm]}
        with borrowed_route(model, name, state):
            out[name] = evaluate(model, {name: data})[name]
    return out


def summary(model: TaskModel, tasks: dict[str, TaskData], seed: int = 0) -> dict:
    """All of the above for `tasks`: `route_distance` between their routes, the cross-route
    matrix (`names`, `cross_route`) with its diagonal and off-diagonal means (`own`,
    `other`), and each task's accuracy with its route's steps shuffled (`shuffled`)."""
    names, acc = cross_route_accuracy(model, tasks)
    own, other = own_and_other(acc)
    return {"route_distance": route_distance(model, list(tasks)), "names": names, "cross_route": acc,
            "own": own, "other": other, "shuffled": shuffled_accuracy(model, tasks, seed=seed)}
