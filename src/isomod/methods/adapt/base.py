"""What every adaptation method shares: the checks of a target, the label-free scores, the
target's start (a copy of a source domain), the registry (`ADAPT`) and what a method is given
(`Target`) and returns (`AdaptResult`), the analysis `route_oracle`, and `adapt()`, which runs
a registered method. The methods themselves live in the submodules of `isomod.methods.adapt`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from isomod.core.network import ModularNet, TaskSpec
from isomod.data.tasks import TaskData
from isomod.errors import IsomodError
from isomod.methods.registry import Methods
from isomod.training.trainer import TrainConfig, Trainer

ADAPT_TRAIN = TrainConfig(steps=300, batch_size=128, lr=1e-3, lr_routes=5e-2, lr_heads=0.0, weight_decay=0.0,
                          warmup_steps=20, augment=False, checkpoint_every=0, log_every=20)
MIN_TARGET_IMAGES = 64
SOURCE_FEATURE_IMAGES = 2000  # images per source whose frozen features the route methods align to
SELECTED_BIAS = 4.0  # route logits start here on the chosen source's module at each step ...
OTHER_SOURCE_BIAS = 2.0  # ... and here on the other sources' modules at that step



def check_target(model: ModularNet, spec: TaskSpec, num_images: int) -> list[str]:
    """The source domains `spec` adapts from; a clear error when it cannot."""
    model.require_routes("domain adaptation")
    if spec.name in model.specs:
        raise IsomodError(f"target domain {spec.name!r} is already a domain of this model (a source); "
                          f"adapt to a domain it was not trained on")
    if not spec.label_space:
        raise IsomodError(f"target {spec.name!r} has no label space; domain adaptation needs a task that shares "
                          f"its classes with the model's source domains (e.g. digits5/*)")
    sources = [n for n, s in model.specs.items() if s.label_space == spec.label_space]
    if not sources:
        spaces = sorted({s.label_space for s in model.specs.values() if s.label_space}) or ["none"]
        raise IsomodError(f"target {spec.name!r} has label space {spec.label_space!r}; this model's source domains "
                          f"have: {', '.join(spaces)}")
    k = model.specs[sources[0]].num_classes
    if spec.num_classes != k:
        raise IsomodError(f"target {spec.name!r} has {spec.num_classes} classes; the source domains "
                          f"({', '.join(sources)}) have {k}")
    if spec.input_shape[0] != model.config.in_channels:
        raise IsomodError(f"target {spec.name!r} has {spec.input_shape[0]}-channel images; the model takes "
                          f"{model.config.in_channels}")
    if num_images < MIN_TARGET_IMAGES:
        raise IsomodError(f"target {spec.name!r} has {num_images} unlabelled images; estimating its normalisation "
                          f"statistics needs at least {MIN_TARGET_IMAGES}")
    return sources


def check_labelled(spec: TaskSpec, labelled: TaskData | None) -> None:
    """Refuse, in one line, missing or mismatched labelled images for a few-label method."""
    if labelled is None:
        raise IsomodError(f"a few-label method needs some labelled images of {spec.name!r} (pass `labelled`, e.g. "
                          "few_shot(target, 10))")
    if labelled.spec.name != spec.name or labelled.spec.num_classes != spec.num_classes:
        raise IsomodError(f"the labelled images are of task {labelled.spec.name!r} with {labelled.spec.num_classes} "
                          f"classes; the target is {spec.name!r} with {spec.num_classes}")
    if len(labelled.y_train) == 0:
        raise IsomodError(f"no labelled images of {spec.name!r} were given")


def unlabelled(spec: TaskSpec, x: torch.Tensor) -> TaskData:
    """Target images as a task the Trainer can draw from: labels -1, no test split."""
    none = torch.full((len(x),), -1, dtype=torch.long)
    return TaskData(spec, x, none, x[:0], none[:0])


# --- unsupervised scores and objectives ---------------------------------------------
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the predictions `(B, K)`."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1).mean()


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean prediction: high when the classes are used evenly."""
    p = torch.softmax(logits, -1).mean(0)
    return -(p * torch.log(p + 1e-8)).sum()


def entropy_objective(model, x, y, task):
    """Entropy minimisation; `y` is never read."""
    logits = model(x, task)
    return entropy(logits), logits


def im_objective(model, x, y, task):
    """Information maximisation: confident (low entropy) and diverse (high marginal
    entropy) predictions; `y` is never read."""
    logits = model(x, task)
    return entropy(logits) - marginal_entropy(logits), logits


def predict_logits(model: ModularNet, x: torch.Tensor, task: str) -> torch.Tensor:
    """Logits `(B, K)` of uint8 images `x` under `task`, in eval mode, on the CPU."""
    head = model.head_of(task)
    with torch.no_grad():
        return model.forward_head(model.features(x, task).to(head.weight.device), task).cpu()


def im_score(model: ModularNet, x: torch.Tensor, task: str) -> float:
    """`entropy - marginal entropy` of the task's predictions on `x`; lower is better."""
    logits = predict_logits(model, x, task)
    return (entropy(logits) - marginal_entropy(logits)).item()


def stats_distance(model: ModularNet, task: str, source: str) -> float:
    """How far `task`'s norm statistics lie from `source`'s: the symmetric KL divergence
    between per-channel Gaussians, averaged over channels and norms. Run on the target
    with `source`'s route, it measures how alien the target looks to that route."""
    if not model.stats_count(task):
        raise IsomodError("route_select compares norm statistics; this model's norms keep none (layer norms of a "
                          "transformer pool): use route_calibrated or another method")
    out = []
    for a, b in zip(model.branch(task).norms, model.branch(source).norms):
        v1, v2 = a.running_var + a.eps, b.running_var + b.eps
        d2 = (a.running_mean - b.running_mean) ** 2
        out.append((0.5 * (v1 / v2 + v2 / v1 + d2 * (1 / v1 + 1 / v2)) - 1).mean())
    return torch.stack(out).mean().item()


# --- the target's start ---------------------------------------------------------------
@dataclass
class AdaptResult:
    """One adaptation: the method, the source whose route (or whose norms) the target
    started from, every source's unsupervised score (`score`: `im`, `stats_distance` or
    `feature_gap`, lower is better), the numbers the adaptation changed (`params_task`;
    for the full-network methods, every number of the model that moved), the target's
    route weights (before discretising, or as kept when soft), whether the learned route
    was kept (source-free route methods), and the training log of the methods that train
    (`history`: the trainer's log records; with sources they carry `align` and, where the
    network trains, `ce`, each the mean over its log interval)."""

    method: str
    source: str
    score: str
    scores: dict[str, float]
    params_task: int
    soft_route: list | None = None
    kept: bool | None = None  # route methods: whether the learned route beat its start
    setting: str = "source_free"
    history: list[dict] | None = None
    info: dict = field(default_factory=dict)  # what a method reports besides (a search's candidates, seconds)


def add_as_copy(model: ModularNet, spec: TaskSpec, source: str) -> None:
    """Add `spec` as a frozen copy of `source`: its norms (statistics included) and its
    route. An earlier copy of the same name is replaced."""
    if spec.name in model.specs:
        model.remove_task(spec.name)
    model.add_task(spec, source=source).requires_grad_(False)


def score_sources(model: ModularNet, spec: TaskSpec, x: torch.Tensor, sources: list[str],
                  score: Callable[[ModularNet, str, str], float]) -> dict[str, float]:
    """Every source's `score(model, target, source)`, with the target added as a copy of the
    source and statistics estimated on the target images `x`; leaves a copy of the last
    source as `spec`."""
    scores = {}
    for s in sources:
        add_as_copy(model, spec, s)
        model.estimate_stats(x, spec.name)
        scores[s] = score(model, spec.name, s)
    return scores


def start_from_sources(model: ModularNet, task: str, sources: list[str], chosen: str) -> None:
    """Make `task`'s route soft, its logits biased towards every source's module at each
    step and most towards `chosen`'s, at temperature 1."""
    model.route(task).start_at(*[(model.route(s).indices(), OTHER_SOURCE_BIAS) for s in sources],
                               (model.route(chosen).indices(), SELECTED_BIAS))


def changed_numbers(before: dict[str, torch.Tensor], model: ModularNet) -> int:
    """Floating-point numbers of `model`'s state that differ from `before` (all of a tensor
    `before` lacks, such as a head the target was given)."""
    after = model.state_dict()
    return sum(int((before[k].to(v.device) != v).sum()) if k in before else v.numel() for k, v in after.items()
               if v.is_floating_point())


# --- the methods ------------------------------------------------------------------------
ADAPT = Methods("adaptation method")


@dataclass
class Target:
    """What an adaptation method is given: the model, the target's spec and unlabelled
    images, the source domains' names, the budget, where to write, (with sources) the
    labelled source data by name, (few labels) the target's labelled images, and the
    method's own options."""

    model: ModularNet
    spec: TaskSpec
    x: torch.Tensor
    sources: list[str]
    config: TrainConfig
    out_dir: str | Path | None
    progress: bool
    source_data: dict[str, TaskData] | None = None
    labelled: TaskData | None = None
    options: dict = field(default_factory=dict)


def by_im(t: Target) -> tuple[str, dict[str, float]]:
    """The source whose route and norms give the most confident and diverse predictions on
    the target images, and every source's IM score."""
    scores = {s: im_score(t.model, t.x, s) for s in t.sources}
    return min(scores, key=scores.get), scores


# --- analysis ---------------------------------------------------------------------------
def route_oracle(base: ModularNet, target: TaskData, sources: list[str], start: str, config: TrainConfig,
                 progress: bool = False) -> tuple[ModularNet, Trainer, int]:
    """A copy of `base` with `target` added and its route alone trained on the target's
    *labels* (analysis only, never an adaptation method): soft to the end, starting like
    the route methods from a mixture of the `sources`' routes that favours `start`, the
    norm statistics following the route and re-estimated at the end. Pool, stem, head and
    sources stay as they are. Returns the model, its trainer (for the loss history) and
    the numbers that changed."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    name = target.spec.name
    add_as_copy(model, target.spec, start)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start_from_sources(model, name, sources, start)
    trainer = Trainer(model, {name: target}, replace(config, routes="soft", eval_every=0), progress=progress,
                      params={"routes": [model.route(name).logits]}, frozen_norm_stats=False)
    trainer.fit()
    model.requires_grad_(False)
    model.estimate_stats(target.x_train, name)
    return model, trainer, changed_numbers(before, model)


def setting(method: str) -> str:
    """What `method` adapts from: `source_free`, `with_sources` or `few_labels`."""
    return ADAPT[method].setting


def adapt(model: ModularNet, target: TaskData, method: str = "route_select", config: TrainConfig = ADAPT_TRAIN,
          out_dir: str | Path | None = None, progress: bool = True, source_data: dict[str, TaskData] | None = None,
          labelled: TaskData | None = None, **options) -> AdaptResult:
    """Add the unlabelled `target` domain to `model` with one of the `ADAPT` methods, in place.

    Only `target.spec` and `target.x_train` are read, and under the `few_labels` methods
    `labelled` too; the target's own labels never are. Except under `m3sda`, `dann`, the
    route methods with `sources_train`, and the few-label `head_only` and `finetune`, pool, stem,
    the shared head and every source domain stay bit-identical. The model is left with every
    parameter frozen.

    Args:
        model: a ModularNet trained on source domains of the target's label space.
        target: the new domain; its training images are the unlabelled adaptation data.
        method: a registered adaptation method (`ADAPT.help()` says what each changes).
        config: steps, batch size and learning rates of `tent` (`lr`) and the route
            methods (`lr_routes`, temperature schedule, `discretize_at`); with sources:
            `lr_routes` for the route, `lr` for the discriminator and, under `m3sda` and
            `dann`, for every parameter of the network; `batch_size` target images and
            as many source images (split evenly over the sources) per step.
        out_dir: run folder for the log and checkpoint of the trained methods.
        progress: show a progress bar.
        source_data: the labelled source domains' data by name (`with_sources` methods only).
        labelled: a few labelled images of the target (`few_labels` methods only), e.g.
            `few_shot(target, 10)`: its name and classes are the target's.
        options: the method's own, e.g. `sources_train=True` for `route_moment` and
            `route_adversarial`, `search=SearchConfig(...)` for `route_search`.
    """
    unit = ADAPT[method]
    names = check_target(model, target.spec, len(target.x_train))
    if unit.setting == "few_labels":
        check_labelled(target.spec, labelled)
        labelled = replace(labelled, x_test=labelled.x_test[:0], y_test=labelled.y_test[:0])  # never evaluated
    model.requires_grad_(False)  # the model is left frozen, whatever the method
    result = unit.run(Target(model, target.spec, target.x_train, names, config, out_dir, progress, source_data, labelled,
                             options))
    model.requires_grad_(False)  # a route started by the method comes back trainable
    return result
