"""Transfer: a new task reuses a trained pool by learning only its route, the norms of its
steps and its head; pool, stem and every other task stay as they were.

`transfer` runs one of the registered methods (`TRANSFER`): route-only learning or one of the
baselines it is measured against (linear probe, norms and head, fine-tuning, training from
scratch). Each method is a function that says what the new task trains; the one loop trains
it. `select_source` picks the pre-training task a new task starts from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from isomod.data.tasks import TaskData
from isomod.errors import IsomodError
from isomod.methods.registry import Methods
from isomod.core.network import ModularNet, TaskModel
from isomod.methods.search import SearchConfig, SearchResult, search_route
from isomod.training.trainer import TrainConfig, Trainer
from isomod import seeds

# Route, norms and head are a few thousand numbers on frozen features: they take a far
# larger learning rate than whole networks.
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


def prepare_route(model: ModularNet, task: TaskData, source: str | None = None) -> None:
    """Add `task` (unless already added); what trains afterwards is
    `model.param_groups([task.name])`: its route, step norms and head (not a head other
    domains run).

    With `source`, the new task starts as a copy of that task's norms and route, the
    route soft: a copy of its logits while it is soft, or `ROUTE_BIAS` on its module at
    each step once it is discrete (weight ~0.78 at bias 4 in a pool of 16).
    """
    model.require_routes("route-only transfer")
    if source is not None:
        model.check_task(source)
    if task.name in model.specs:
        if model.specs[task.name].num_classes != task.spec.num_classes:
            raise IsomodError(f"task {task.name!r} exists with {model.specs[task.name].num_classes} classes, "
                              f"the data has {task.spec.num_classes}")
        return
    model.add_task(task.spec, source=source)
    if source is not None and model.route(source).is_discrete:
        model.route(task.name).start_at((model.route(source).indices(), ROUTE_BIAS))


def fit_route(model: ModularNet, task: TaskData, config: TrainConfig = TRANSFER_TRAIN,
              out_dir: str | Path | None = None, source: str | None = None,
              progress: bool = True) -> dict[str, float]:
    """Add `task` to a trained model (unless already added) and learn only its route,
    step norms and head; returns its test accuracy.

    Args:
        model: a trained ModularNet; its pool, stem and other tasks stay as they are.
        task: the new task's data.
        config: budget and schedule of the route-only training.
        out_dir: run folder; its checkpoint serves every earlier task unchanged.
        source: an existing task whose step norms the new task starts from, and whose
            route its own starts biased towards (see `prepare_route`).
        progress: show a progress bar.
    """
    seeds.seed(config.seed)  # the new head's initial weights follow the seed, not what ran before
    prepare_route(model, task, source)
    return Trainer(model, {task.name: task}, config, out_dir=out_dir, progress=progress, train_tasks=[task.name],
                   params=model.param_groups([task.name])).fit()


# --- the methods ------------------------------------------------------------------------
TRANSFER = Methods("transfer method")


@dataclass
class NewTask:
    """What a transfer method is given: the trained model, the new task's data, the existing
    task it starts from, the budget, where to write, and the method's own options."""

    model: ModularNet
    task: TaskData
    source: str
    config: TrainConfig
    out_dir: str | Path | None
    progress: bool
    options: dict = field(default_factory=dict)


@dataclass
class Setup:
    """What a transfer method trains: the model that serves the new task, its parameters by
    role, the modules whose norms keep their running statistics while training, the numbers
    it set without training them (re-estimated statistics, a searched route) and what else
    it reports (`info`)."""

    model: TaskModel
    params: dict[str, list[torch.nn.Parameter]]
    fixed_stats: list[torch.nn.Module] = field(default_factory=list)
    numbers_set: int = 0
    info: dict = field(default_factory=dict)
    search: SearchResult | None = None  # route_search: what the search scored


def train(t: NewTask, setup: Setup) -> TransferResult:
    """Train what `setup` says with the one loop; the result with the numbers the task added."""
    name = t.task.name
    trainer = Trainer(setup.model, {name: t.task}, t.config, out_dir=t.out_dir, progress=t.progress,
                      train_tasks=[name], params=setup.params, fixed_stats=setup.fixed_stats)
    accs = trainer.fit()
    trained = sum(p.numel() for ps in setup.params.values() for p in ps)
    return TransferResult(setup.model, accs[name], trained + setup.numbers_set, t.source,
                          (trainer.soft_usage or {}).get(name), info=setup.info, search=setup.search)


@TRANSFER.register("route_only", "transfer", "a new route, step norms and head, in place; every earlier task is "
                   "served unchanged", learns_route=True, changes={"route", "norms", "head"},
                   compare=("norm_head", "head_only", "finetune"), style=("o", "tab:red"), default=True)
def route_only(t: NewTask) -> TransferResult:
    prepare_route(t.model, t.task, source=t.source)
    return train(t, Setup(t.model, t.model.param_groups([t.task.name])))


@TRANSFER.register("route_head", "transfer", "a new route and head, in place, over the source's frozen step norms "
                   "(with module-owned affine parameters the steps hold statistics only, which follow the new "
                   "route)", learns_route=True, changes={"route", "head"}, compare=("head_only",),
                   style=("P", "tab:orange"))
def route_head(t: NewTask) -> TransferResult:
    prepare_route(t.model, t.task, source=t.source)
    return train(t, Setup(t.model, t.model.param_groups([t.task.name], roles=("routes", "heads"))))


@TRANSFER.register("head_only", "transfer", "a linear probe, in place: a new head over the source's route and "
                   "norms, frozen (statistics included)", changes={"head"}, baseline_for=("transfer",),
                   style=("s", "tab:blue"))
def head_only(t: NewTask) -> TransferResult:
    branch = t.model.add_task(t.task.spec, source=t.source)
    return train(t, Setup(t.model, t.model.param_groups([t.task.name], roles=("heads",)), [branch.norms]))


@TRANSFER.register("norm_head", "transfer", "the source's route; new step norms (a model patch) and head, in place",
                   changes={"norms", "head"}, style=("D", "tab:green"))
def norm_head(t: NewTask) -> TransferResult:
    branch = t.model.add_task(t.task.spec, source=t.source)
    heads = t.model.param_groups([t.task.name], roles=("heads",))
    return train(t, Setup(t.model, {**heads, "norms": list(branch.norms.parameters())}))


def stats_sample(task: TaskData, search: SearchConfig) -> torch.Tensor:
    """The task's training images its statistics are estimated on (the search's own sample)."""
    g = torch.Generator().manual_seed(search.seed)
    return task.x_train[torch.randperm(len(task.x_train), generator=g)[: search.stats_images]]


@TRANSFER.register("stats_head", "transfer", "the source's route with its norm statistics re-estimated on the task's "
                   "images, and a new head (route_search's start, without the search)", changes={"statistics", "head"},
                   searches=True, style=("p", "tab:cyan"))
def stats_head(t: NewTask) -> TransferResult:
    search = t.options.get("search") or SearchConfig(seed=t.config.seed)
    branch = t.model.add_task(t.task.spec, source=t.source)
    t.model.estimate_stats(stats_sample(t.task, search), t.task.name)
    return train(t, Setup(t.model, t.model.param_groups([t.task.name], roles=("heads",)), [branch.norms],
                          numbers_set=t.model.stats_count(t.task.name)))


@TRANSFER.register("route_search", "transfer", "a discrete route found by search from the source's "
                   "(isomod.methods.search: every candidate's statistics re-estimated on the task's images, scored by "
                   "a leave-one-out proxy on its labelled images), those statistics, and a new head", learns_route=True,
                   changes={"route", "statistics", "head"}, searches=True, style=("*", "tab:brown"))
def route_search(t: NewTask) -> TransferResult:
    search = t.options.get("search") or SearchConfig(seed=t.config.seed)
    model, name = t.model, t.task.name
    branch = model.add_task(t.task.spec, source=t.source)
    found = search_route(model, name, t.task.x_train, t.task.x_train, t.task.y_train, model.route(t.source).indices(),
                         search)
    info = {"strategy": search.strategy, "proxy": search.proxy, "candidates": found.candidates,
            "search_seconds": found.seconds, "proxy_start": round(found.start_score, 5),
            "proxy_found": round(found.score, 5)}
    return train(t, Setup(model, model.param_groups([name], roles=("heads",)), [branch.norms],
                          numbers_set=model.stats_count(name) + model.route(name).steps, info=info, search=found))


@TRANSFER.register("finetune", "transfer", "a copy of the whole model from the source's route and norms: stem, "
                   "pool, norms and head trained", changes={"network", "norms", "head"}, style=("^", "tab:purple"))
def finetune(t: NewTask) -> TransferResult:
    target = copy.deepcopy(t.model)
    branch = target.add_task(t.task.spec, source=t.source)
    return train(t, Setup(target, {**target.param_groups([t.task.name], roles=("heads",)),
                                   "norms": list(branch.norms.parameters()), "stem": list(target.stem.parameters()),
                                   "pool": list(target.pool.parameters())}))


@TRANSFER.register("scratch", "transfer", "a fresh network of the same shape, route included, trained on the task",
                   changes={"network", "route", "norms", "head"}, style=("v", "tab:gray"))
def scratch(t: NewTask) -> TransferResult:
    target = ModularNet(replace(t.model.config, num_modules=len(t.model.pool)), [t.task.spec])
    return train(t, Setup(target, target.param_groups()))


TRANSFER_METHODS = TRANSFER.names()


@dataclass
class TransferResult:
    """What one transfer run gives: the model serving the new task, its test accuracy,
    and the numbers the task added (the trained ones and those set without training, such
    as re-estimated statistics; a fine-tuned or scratch network counts whole, since the
    task needs all of it)."""

    model: TaskModel
    test_acc: float
    params_task: int
    source: str | None
    soft_route: list | None = None  # (L, N) route weights just before discretising
    route_steps_changed: int | None = None  # route methods: steps whose module (argmax) differs from the source's
    route_change: float | None = None  # route methods: mean total variation from the source's route weights
    info: dict = field(default_factory=dict)  # what the method reports besides (a search's candidates, seconds)
    search: SearchResult | None = None  # route_search: every route scored, for analysis


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
        f = F.normalize(model.features(x, name), dim=1)  # (B, C)
        sums = torch.zeros(k, f.shape[1]).index_add_(0, y, f)  # (K, C)
        sim = f @ F.normalize(sums, dim=1).T  # (B, K)
        own = F.normalize(sums[y] - f, dim=1)  # the own class without the image itself
        sim[torch.arange(len(y)), y] = (f * own).sum(1)
        sim[:, counts == 0] = -2.0
        scores[name] = (sim.argmax(1) == y)[usable].float().mean().item()
    return max(scores, key=scores.get), scores


def transfer(model: ModularNet, task: TaskData, method: str, config: TrainConfig = TRANSFER_TRAIN,
             source: str | None = None, out_dir: str | Path | None = None, progress: bool = True,
             **options) -> TransferResult:
    """Learn a new task on a trained model with one of the `TRANSFER` methods (`route_only`,
    `route_head`, `head_only`, `norm_head`, `stats_head`, `route_search`, `finetune`,
    `scratch`; `TRANSFER.help()` says what each trains).

    Args:
        model: a trained ModularNet.
        task: the new task's data.
        method: a registered transfer method.
        config: the budget, the same for every method.
        source: the existing task to start from (norms, and the route of the methods
            that keep one); None picks it with `select_source`.
        out_dir: run folder for the log and checkpoint.
        progress: show a progress bar.
        options: what the method takes besides, e.g. `search=SearchConfig(...)` for
            `route_search` and `stats_head`.
    """
    unit = TRANSFER[method]
    model.require_routes("transfer")
    if source is None:
        source = select_source(model, task, seed=config.seed)[0]
    model.check_task(source)
    seeds.seed(config.seed)  # new heads (and a scratch network) follow the seed, not what ran before
    result = unit.run(NewTask(model, task, source, config, out_dir, progress, options))
    if unit.learns_route:
        new, old = result.model.route(task.name), result.model.route(source)
        result.route_steps_changed = sum(a != b for a, b in zip(new.indices(), old.indices()))
        result.route_change = round(0.5 * (new.weights() - old.weights()).abs().sum(-1).mean().item(), 5)
    return result
