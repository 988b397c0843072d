"""What several benches measure besides accuracy: a route's soft and discrete accuracies,
multiply-adds per image, and the training loss over the last fifths of a run (read from its
log)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from isomod.core.network import ModularNet
from isomod.data.tasks import TaskData
from isomod.training.batches import evaluate


def route_accuracies(model: ModularNet, target: TaskData, acc: float, soft: list | None,
                     reestimate: bool = True) -> dict:
    """A route row's `route_form` (what its accuracy `acc` measured), `acc_soft` (where a soft
    route existed: the route as it ended, or the weights it had when it was discretised) and
    `acc_discretized` (one module per step). With `reestimate`, the other form's norm
    statistics are re-estimated on the target's images (a method whose statistics followed
    its route); without, they stay as the method held them (frozen statistics: re-estimating
    them would change the features its head was trained on)."""
    name = target.spec.name
    if not model.route(name).is_discrete:
        return {"route_form": "soft", "acc_soft": round(acc, 5),
                "acc_discretized": discretized(model, target, reestimate)[0]}
    out = {"route_form": "discrete", "acc_discretized": round(acc, 5)}
    if soft is not None:
        out["acc_soft"] = soft_accuracy(model, target, soft, reestimate)
    return out


def soft_accuracy(model: ModularNet, target: TaskData, weights: list, reestimate: bool = True) -> float:
    """Test accuracy (rounded) of a copy of `model` whose route for `target` runs the soft
    weights `(L, N)`, statistics re-estimated on the target images (with `reestimate`)."""
    name = target.spec.name
    soft = copy.deepcopy(model)
    soft.route(name).set_logits(torch.tensor(weights, dtype=torch.float32).clamp_min(1e-12).log())
    if reestimate:
        soft.estimate_stats(target.x_train, name)
    return round(evaluate(soft, {name: target})[name], 5)


def discretized(model: ModularNet, target: TaskData, reestimate: bool = True) -> tuple[float, list[int]]:
    """Test accuracy (rounded) of a copy of `model` whose soft route for `target` is frozen to
    its argmax, statistics re-estimated on the target images (with `reestimate`); and that
    route."""
    name = target.spec.name
    hard = copy.deepcopy(model)
    hard.discretize(name)
    if reestimate:
        hard.estimate_stats(target.x_train, name)
    return round(evaluate(hard, {name: target})[name], 5), hard.route(name).indices()


@torch.no_grad()
def macs_per_image(model, task: str) -> int:
    """Multiply-adds of one forward pass of one image of `task` as the model runs it now
    (convolutions and linear layers, counted by `torch.utils.flop_counter`; a soft route
    under weight mixing also counts the mixing of the modules' weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = model.check_task(task)
    param = next(model.parameters())
    with model.evaluating(), FlopCounterMode(display=False) as counter:
        model(torch.zeros((1, *spec.input_shape), device=param.device, dtype=param.dtype), task)
    return counter.get_total_flops() // 2


def read_log(path: Path) -> list[dict]:
    """The records of a run's `log.jsonl` (none when the file is missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_fifths(records: list[dict]) -> tuple[float, float] | None:
    """Mean logged training loss over the fourth and over the last fifth of a run's steps:
    a converged run has the two about equal."""
    rec = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not rec:
        return None
    end = rec[-1][0]
    fourth = [loss for step, loss in rec if 0.6 * end < step <= 0.8 * end]
    last = [loss for step, loss in rec if step > 0.8 * end]
    if not fourth or not last:
        return None
    return sum(fourth) / len(fourth), sum(last) / len(last)
