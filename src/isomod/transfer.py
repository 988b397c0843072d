"""Route-only learning: a new task reuses a trained pool by learning only its route, the
norms of its steps and its head; pool, stem and every other task stay as they were.

`transfer` runs it or one of the baselines it is measured against (linear probe, norms and
head, fine-tuning, training from scratch); `select_source` picks the pre-training task a
new task starts from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from isomod.data.tasks import TaskData
from isomod.errors import IsomodError, check_choice
from isomod.network import ModularNet, TaskModel
from isomod.train import TrainConfig, Trainer, to_float

# Route, norms and head are a few thousand numbers on frozen features: they take a far
# larger learning rate than whole networks. On held-out Georgian glyphs (400 steps) route-only
# scored 73.3% at 5e-3, 84.6% at 2e-2 and 87.0% at 5e-2 (Hebrew: 88.2% at 5e-3, 93.4% at 2e-2).
TRANSFER_TRAIN = TrainConfig(steps=600, batch_size=128, lr=5e-2, lr_heads=5e-2, warmup_steps=20,
                             checkpoint_every=0, log_every=20)
ROUTE_BIAS = 4.0


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


def prepare_route(model: ModularNet, task: TaskData, init_from: str | None = None,
                  route_bias: float = ROUTE_BIAS) -> None:
    """Add `task` (unless already added); what trains afterwards is
    `model.param_groups([task.name])`: its route, step norms and head (not a head other
    domains run).

    With `init_from`, the new task starts from that task's norms and route: a copy of its
    logits while that route is soft, or `route_bias` on its module at each step once it is
    discrete (weight ~0.78 at bias 4 in a pool of 16; 0 keeps the model's own route init).
    """
    model.require_routes("route-only transfer")
    if init_from is not None:
        model.check_task(init_from)
    if task.name not in model.specs:
        model.add_task(task.spec, copy_norms_from=init_from)
        if init_from is not None and not model.route(init_from).is_discrete:
            copy_route(model, task.name, init_from)
        elif init_from is not None and route_bias:
            route = model.route(task.name)
            with torch.no_grad():
                route.logits.zero_()
                route.logits[torch.arange(route.steps), torch.tensor(model.route(init_from).indices())] = route_bias
    elif model.specs[task.name].num_classes != task.spec.num_classes:
        raise IsomodError(f"task {task.name!r} exists with {model.specs[task.name].num_classes} classes, "
                          f"the data has {task.spec.num_classes}")


def copy_route(model: ModularNet, task: str, source: str) -> None:
    """Give `task` the route `source` runs: its soft logits and temperature, or its modules."""
    new, old = model.route(task), model.route(source)
    if old.is_discrete:
        new.set_choice(old.indices())
        return
    with torch.no_grad():
        new.logits.copy_(old.logits)
        new.temperature.copy_(old.temperature)


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
        init_from: an existing task whose step norms the new task starts from, and whose
            route its own starts biased towards (see `prepare_route`).
        progress: show a progress bar.
    """
    torch.manual_seed(config.seed)  # the new head's initial weights follow the seed, not what ran before
    prepare_route(model, task, init_from)
    return Trainer(model, {task.name: task}, config, out_dir=out_dir, progress=progress, train_tasks=[task.name],
                   params=model.param_groups([task.name])).fit()


TRANSFER_METHODS = ("route_only", "route_head", "head_only", "norm_head", "finetune", "scratch")
ROUTE_METHODS = ("route_only", "route_head")


@dataclass
class TransferResult:
    """What one transfer run gives: the model serving the new task, its test accuracy,
    and the parameters the task added (only the trained ones; a fine-tuned or scratch
    network counts whole, since the task needs all of it)."""

    model: TaskModel
    test_acc: float
    params_task: int
    source: str | None
    soft_route: list | None = None  # (L, N) route weights just before discretising
    route_steps_changed: int | None = None  # route methods: steps whose module (argmax) differs from the source's
    route_change: float | None = None  # route methods: mean total variation from the source's route weights


@torch.no_grad()
def task_features(model: ModularNet, task: str, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Pooled features `(B, C)` of uint8 images `x` under `task`'s route, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model.forward_features(to_float(x[i : i + batch_size].to(device)), task).cpu()
                     for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def select_source(model: ModularNet, task: TaskData, max_images: int = 1000, seed: int = 0) -> tuple[str, dict[str, float]]:
    """The existing task whose frozen features best separate the new task's classes.

    Each candidate's route embeds up to `max_images` training images; the score is the
    leave-one-out accuracy of a nearest-class-mean classifier (cosine) on them. Returns
    the best task and every candidate's score.
    """
    if not model.task_names:
        raise IsomodError("the model has no tasks to transfer from")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(task.y_train), generator=g)[:max_images]
    x, y = task.x_train[idx], task.y_train[idx]
    k = task.spec.num_classes
    counts = torch.bincount(y, minlength=k).float()  # (K,)
    usable = counts[y] > 1
    if not usable.any():
        raise IsomodError(f"task {task.name!r}: choosing a source task needs two training images of some class")
    scores = {}
    for name in model.task_names:
        f = F.normalize(task_features(model, name, x), dim=1)  # (B, C)
        sums = torch.zeros(k, f.shape[1]).index_add_(0, y, f)  # (K, C)
        sim = f @ F.normalize(sums, dim=1).T  # (B, K)
        own = F.normalize(sums[y] - f, dim=1)  # the own class without the image itself
        sim[torch.arange(len(y)), y] = (f * own).sum(1)
        sim[:, counts == 0] = -2.0
        scores[name] = (sim.argmax(1) == y)[usable].float().mean().item()
    return max(scores, key=scores.get), scores


def transfer(model: ModularNet, task: TaskData, method: str, config: TrainConfig = TRANSFER_TRAIN,
             source: str | None = None, out_dir: str | Path | None = None, progress: bool = True) -> TransferResult:
    """Learn a new task on a trained model with one of `TRANSFER_METHODS`.

    - `route_only`: `fit_route`, in place: a new route, step norms and head; nothing
      else changes, every earlier task is served unchanged.
    - `route_head`: in place, a new route and head only; the step norms are the source's,
      frozen (statistics included), so only the order of modules adapts the features.
      When the modules own the norms' affine parameters, the steps hold statistics only,
      and the new task's follow its own data and route.
    - `head_only`: a linear probe, in place: the source task's route and norms, frozen
      (statistics included); only a new head is trained.
    - `norm_head`: the source's route; step norms (a "model patch") and head trained
      (with module-owned affine parameters: the task's own statistics and its head).
    - `finetune`: a copy of the model starting from the source's route and norms, then
      stem, pool, norms and head all trained.
    - `scratch`: a fresh network of the same shape, route included, trained on the task.

    Args:
        model: a trained ModularNet.
        task: the new task's data.
        method: one of `TRANSFER_METHODS`.
        config: the budget, the same for every method.
        source: the existing task to start from (norms, and the route of the methods
            that keep one); None picks it with `select_source`.
        out_dir: run folder for the log and checkpoint.
        progress: show a progress bar.
    """
    check_choice("transfer method", method, TRANSFER_METHODS)
    model.require_routes("transfer")
    if source is None:
        source = select_source(model, task, seed=config.seed)[0]
    model.check_task(source)
    torch.manual_seed(config.seed)  # new heads (and a scratch network) follow the seed, not what ran before
    fixed_stats = []
    if method in ROUTE_METHODS:
        target = model
        prepare_route(model, task, init_from=source)
        params = model.param_groups([task.name])
        if method == "route_head":
            del params["norms"]
    elif method == "scratch":
        shape = replace(model.config, num_modules=len(model.pool))
        target = ModularNet(shape, [task.spec])
        params = target.param_groups()
    else:
        target = copy.deepcopy(model) if method == "finetune" else model
        branch = target.add_task(task.spec, copy_norms_from=source)
        copy_route(target, task.name, source)
        params = {"heads": target.param_groups([task.name])["heads"]}
        if method in ("norm_head", "finetune"):
            params["norms"] = list(branch.norms.parameters())
        else:
            fixed_stats = [branch.norms]
        if method == "finetune":
            params.update(stem=list(target.stem.parameters()), pool=list(target.pool.parameters()))
    trainer = Trainer(target, {task.name: task}, config, out_dir=out_dir, progress=progress, train_tasks=[task.name],
                      params=params, fixed_stats=fixed_stats)
    accs = trainer.fit()
    soft = (trainer.soft_usage or {}).get(task.name)
    trained = sum(p.numel() for ps in params.values() for p in ps)
    result = TransferResult(target, accs[task.name], trained, source, soft)
    if method in ROUTE_METHODS:
        new, old = target.route(task.name), target.route(source)
        result.route_steps_changed = sum(a != b for a, b in zip(new.indices(), old.indices()))
        result.route_change = round(0.5 * (new.weights() - old.weights()).abs().sum(-1).mean().item(), 5)
    return result
