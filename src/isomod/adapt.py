"""Unsupervised multi-source domain adaptation by re-ordering pretrained modules.

A model trained on several labelled *source domains* (tasks of one label space: a shared
stem, pool and head, one route and set of step norms per domain) meets a new, unlabelled
*target domain*. The target becomes one more domain of the model: its own route and step
norms, the shared head. Pool, stem, head and every source stay exactly as they were.

Methods (`ADAPT_METHODS`); none reads a target label:

- `source_only`: the source route and norms whose predictions on the target are the
  most confident and diverse (`im_score`), used as they are.
- `adabn`: that route with norm statistics re-estimated on the target images.
- `tent`: `adabn`, then the norms' affine parameters trained to minimise prediction
  entropy (Wang et al., 2021).
- `route_select`: every source route runs the target images with statistics estimated
  on them; the route whose target statistics lie closest to its own source statistics
  (`stats_distance`, a domain similarity) is kept, with the target statistics.
- `route_entropy`, `route_im`: the target's route is learned, starting from a mixture
  of the source routes that favours `source_only`'s, by minimising prediction entropy
  or by information maximisation (confident and diverse predictions); norm statistics
  follow the route (batch statistics while learning, re-estimated at the end). Only the
  route logits are trained. The learned route is kept only when its `im_score` beats
  the starting route's; otherwise the starting route comes back.

Choosing a route by prediction confidence after re-estimating statistics is a trap: on
`digits5/mnistm`, the MNIST route becomes the most confident (IM -1.59 against -1.32)
and is the least accurate (35% against 63%). Statistics distance ranks it last.

Those are the *source-free* methods (`SOURCE_FREE`). With the labelled source domains at
hand (`WITH_SOURCES`, pass `sources`), the target's route is trained to make the target's
features (the pooled features the head reads) look like the sources':

- `route_moment`: per-feature means and second moments of the target's features matched
  to the nearest source's (moment matching, as M3SDA does for a whole network).
- `route_adversarial`: a small domain discriminator learns to tell the nearest source's
  features from the target's; the route is trained through a reversed gradient to fool
  it (DANN's game, played by the route alone).

The nearest source is the one whose route, run on the target images with statistics
estimated there, gives features whose moments lie closest to that source's own
(`feature_gap`). Both methods start from a mixture of the source routes that favours
it, train only the target's route logits (its norm statistics follow the route), and
keep the route soft: pool, stem, head and sources stay bit-identical. They align to one
source, not to all: the frozen sources' features lie far apart (their mean gap to each
other is several times a target's gap to its nearest source), so a target cannot match
them all. The baselines of that setting change the whole network, trained on the
sources' labels at the same time, and align to every source:

- `m3sda`: moment matching between target and each source and between sources (Peng et
  al., 2019), plus the sources' cross-entropy, every parameter trained.
- `dann`: a domain discriminator behind a gradient reversal layer (Ganin et al., 2016),
  plus the sources' cross-entropy, every parameter trained.

Their target starts as a copy of the nearest source (route and norms).

Every method is a registered unit (`ADAPT`, `isomod.methods`) with its setting and what it
changes; every one that trains runs through the one `Trainer` (the alignment losses are
objectives, `isomod.align`).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from isomod.align import SourceAlignment, moment_gap, moments
from isomod.data.tasks import TaskData
from isomod.errors import IsomodError
from isomod.methods import Methods
from isomod.network import ModularNet, TaskSpec
from isomod.route_schedule import RouteSchedule
from isomod.train import TrainConfig, Trainer

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


def predict_logits(model: ModularNet, task: str, x: torch.Tensor) -> torch.Tensor:
    """Logits `(B, K)` of uint8 images `x` under `task`, in eval mode, on the CPU."""
    head = model.head_of(task)
    with torch.no_grad():
        return model.forward_head(model.features(x, task).to(head.weight.device), task).cpu()


def im_score(model: ModularNet, task: str, x: torch.Tensor) -> float:
    """`entropy - marginal entropy` of the task's predictions on `x`; lower is better."""
    logits = predict_logits(model, task, x)
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
    model.add_task(spec, start_from=source).requires_grad_(False)


def score_sources(model: ModularNet, spec: TaskSpec, x: torch.Tensor, sources: list[str],
                  score: Callable[[ModularNet, str, str], float]) -> dict[str, float]:
    """Every source's `score(model, target, source)`, with the target added as a copy of the
    source and statistics estimated on the target images `x`; leaves a copy of the last
    source as `spec`."""
    scores = {}
    for s in sources:
        add_as_copy(model, spec, s)
        model.estimate_stats(spec.name, x)
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
    data: dict[str, TaskData] | None = None
    labelled: TaskData | None = None
    options: dict = field(default_factory=dict)


def by_im(t: Target) -> tuple[str, dict[str, float]]:
    """The source whose route and norms give the most confident and diverse predictions on
    the target images, and every source's IM score."""
    scores = {s: im_score(t.model, s, t.x) for s in t.sources}
    return min(scores, key=scores.get), scores


@ADAPT.register("source_only", "source_free", "nothing: the most confident and diverse source route and norms "
                "(IM score) run the target as they are")
def source_only(t: Target) -> AdaptResult:
    source, scores = by_im(t)
    add_as_copy(t.model, t.spec, source)
    return AdaptResult("source_only", source, "im", scores, 0)


@ADAPT.register("adabn", "source_free", "the norm statistics of source_only's route, re-estimated on the target")
def adabn(t: Target) -> AdaptResult:
    source, scores = by_im(t)
    add_as_copy(t.model, t.spec, source)
    t.model.estimate_stats(t.spec.name, t.x)
    return AdaptResult("adabn", source, "im", scores, t.model.stats_count(t.spec.name))


@ADAPT.register("route_select", "source_free", "the source route whose target statistics lie closest to its own "
                "source statistics, with the target statistics", sets_route=True)
def route_select(t: Target) -> AdaptResult:
    scores = score_sources(t.model, t.spec, t.x, t.sources, stats_distance)
    source = min(scores, key=scores.get)
    add_as_copy(t.model, t.spec, source)
    t.model.estimate_stats(t.spec.name, t.x)
    return AdaptResult("route_select", source, "stats_distance", scores, t.model.stats_count(t.spec.name))


@ADAPT.register("tent", "source_free", "adabn, then the norms' affine parameters trained to minimise prediction "
                "entropy (TENT)", tunes=("lr",))
def tent(t: Target) -> AdaptResult:
    source, scores = by_im(t)
    add_as_copy(t.model, t.spec, source)
    t.model.estimate_stats(t.spec.name, t.x)
    params = {"norms": [p for m in t.model.branch(t.spec.name).norms for p in m.parameters()]}
    train_target(t, params, entropy_objective, frozen_norm_stats=True)
    changed = sum(p.numel() for ps in params.values() for p in ps) + t.model.stats_count(t.spec.name)
    return AdaptResult("tent", source, "im", scores, changed)


def train_target(t: Target, params: dict, objective, frozen_norm_stats: bool, **options) -> Trainer:
    """Train `params` on the target's unlabelled images with `objective`, then discretise its
    route (when soft) and re-estimate its statistics."""
    trainer = Trainer(t.model, {t.spec.name: unlabelled(t.spec, t.x)}, t.config, out_dir=t.out_dir,
                      objective=objective, progress=t.progress, train_tasks=[t.spec.name], params=params,
                      frozen_norm_stats=frozen_norm_stats, **options)
    trainer.fit()
    t.model.discretize(t.spec.name)
    t.model.estimate_stats(t.spec.name, t.x)
    return trainer


def learn_route(t: Target, method: str, objective) -> AdaptResult:
    """The target's route learned from a mixture of the source routes favouring
    source_only's, by `objective` on the target images (statistics follow the route);
    kept only when its IM score beats its start's."""
    source, scores = by_im(t)
    model, name = t.model, t.spec.name
    add_as_copy(model, t.spec, source)
    model.estimate_stats(name, t.x)
    start = (model.route(name).indices(), im_score(model, name, t.x))  # the source route, target statistics
    start_from_sources(model, name, t.sources, source)
    params = {"routes": [model.route(name).logits]}
    trainer = train_target(t, params, objective, frozen_norm_stats=False)
    # A route that collapsed onto a few classes scores worse than its start and is
    # undone. A confidently wrong route can still pass: IM is only a proxy.
    kept = im_score(model, name, t.x) < start[1]
    if not kept:
        model.route(name).set_choice(start[0])
        model.estimate_stats(name, t.x)
    changed = model.route(name).logits.numel() + model.stats_count(name)
    return AdaptResult(method, source, "im", scores, changed, (trainer.soft_usage or {}).get(name), kept)


@ADAPT.register("route_entropy", "source_free", "the target's route (and statistics) learned by minimising "
                "prediction entropy", learns_route=True, tunes=("lr_routes",))
def route_entropy(t: Target) -> AdaptResult:
    return learn_route(t, "route_entropy", entropy_objective)


@ADAPT.register("route_im", "source_free", "the target's route (and statistics) learned by information "
                "maximisation", learns_route=True, tunes=("lr_routes",))
def route_im(t: Target) -> AdaptResult:
    return learn_route(t, "route_im", im_objective)


# --- with the labelled sources --------------------------------------------------------
def nearest_source(t: Target) -> tuple[str, dict[str, float], dict[str, torch.Tensor]]:
    """The source whose route, run on the target with statistics estimated there, gives
    features whose moments lie closest to that source's own (`feature_gap`); every
    source's gap; and the sources' frozen features."""
    missing = [n for n in t.sources if n not in (t.data or {})]
    if missing:
        raise IsomodError(f"this method adapts with the labelled source domains; their data is missing for "
                          f"{', '.join(missing)} (pass `sources`, a dict of TaskData by name)")
    device = next(t.model.parameters()).device
    feats = {s: t.model.features(t.data[s].x_train[:SOURCE_FEATURE_IMAGES], s).to(device) for s in t.sources}
    reference = {s: moments(f) for s, f in feats.items()}

    def feature_gap(model: ModularNet, task: str, s: str) -> float:
        return moment_gap(moments(model.features(t.x[:SOURCE_FEATURE_IMAGES], task)), reference[s]).item()

    scores = score_sources(t.model, t.spec, t.x, t.sources, feature_gap)
    return min(scores, key=scores.get), scores, feats


def align_with_sources(t: Target, method: str, align: str, route_only: bool) -> AdaptResult:
    """The target aligned with the sources by `align` (see `isomod.align`): its route alone
    towards the nearest source's frozen features, or the whole network with every source's
    cross-entropy, or (`sources_train` in the options, route methods) its route while stem,
    pool, head and the sources keep training on the sources' labels; then its statistics
    re-estimated."""
    source, scores, feats = nearest_source(t)
    model, name = t.model, t.spec.name
    add_as_copy(model, t.spec, source)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # the target equals its source here
    config = replace(t.config, batch_order="random", augment=False)
    torch.manual_seed(config.seed)  # the discriminator's initial weights
    sources_train = route_only and bool(t.options.get("sources_train"))
    channels = model.config.channels
    if route_only:
        start_from_sources(model, name, t.sources, source)
    if sources_train:
        params = network_params(model, exclude=name)
        params["routes"] = params.get("routes", []) + [model.route(name).logits]
        config = replace(config, lr_heads=config.lr)
        objective = SourceAlignment(align, t.sources, config.batch_size, channels, target_logits=model.route(name).logits)
    elif route_only:
        params = {"routes": [model.route(name).logits]}
        objective = SourceAlignment(align, [source], config.batch_size, channels, bank=feats[source])
    else:
        params = model.param_groups(include_frozen=True)
        config = replace(config, lr_heads=config.lr)  # every number of the network trains at one rate
        objective = SourceAlignment(align, t.sources, config.batch_size, channels)
    trainer = Trainer(model, {name: unlabelled(t.spec, t.x), **{s: t.data[s] for s in t.sources}}, config,
                      out_dir=t.out_dir, objective=objective, progress=t.progress, train_tasks=[name],
                      params=params, routes=RouteSchedule.soft(), frozen_norm_stats=False)
    trainer.fit()
    model.estimate_stats(name, t.x)
    soft = model.route(name).weights().detach().cpu().tolist() if route_only else None
    own = model.route(name).logits.numel() + model.stats_count(name)
    return AdaptResult(method, source, "feature_gap", scores, changed_numbers(before, model), soft,
                       setting="with_sources", history=trainer.history,
                       info={"sources_train": sources_train, "target_numbers": own} if sources_train else {})


def network_params(model: ModularNet, exclude: str) -> dict[str, list[torch.nn.Parameter]]:
    """Every parameter of the network by role (the frozen ones too), without what task
    `exclude` owns."""
    own = {id(p) for ps in model.param_groups([exclude]).values() for p in ps}
    own |= {id(p) for p in model.branch(exclude).parameters()}
    groups = model.param_groups(include_frozen=True)
    return {k: [p for p in v if id(p) not in own] for k, v in groups.items()}


@ADAPT.register("route_moment", "with_sources", "the target's route alone, trained to match its features' moments "
                "to the nearest source's", learns_route=True, tunes=("lr_routes",))
def route_moment(t: Target) -> AdaptResult:
    return align_with_sources(t, "route_moment", "moment", route_only=True)


@ADAPT.register("route_adversarial", "with_sources", "the target's route alone, trained through a reversed gradient "
                "to fool a discriminator of the nearest source's features from the target's", learns_route=True,
                tunes=("lr_routes",))
def route_adversarial(t: Target) -> AdaptResult:
    return align_with_sources(t, "route_adversarial", "adversarial", route_only=True)


@ADAPT.register("m3sda", "with_sources", "every number of the network: the sources' cross-entropy plus moment "
                "matching of target and sources (M3SDA)", tunes=("lr",))
def m3sda(t: Target) -> AdaptResult:
    return align_with_sources(t, "m3sda", "moment", route_only=False)


@ADAPT.register("dann", "with_sources", "every number of the network: the sources' cross-entropy plus a domain "
                "discriminator behind gradient reversal (DANN)", tunes=("lr",))
def dann(t: Target) -> AdaptResult:
    return align_with_sources(t, "dann", "adversarial", route_only=False)


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
    model.estimate_stats(name, target.x_train)
    return model, trainer, changed_numbers(before, model)


for _module in ("isomod.adapt_few", "isomod.adapt_select"):  # the methods of the other settings register there
    importlib.import_module(_module)

SOURCE_FREE = ADAPT.names("source_free")
WITH_SOURCES = ADAPT.names("with_sources")
FEW_LABELS = ADAPT.names("few_labels")
ADAPT_METHODS = SOURCE_FREE + WITH_SOURCES  # the unsupervised ones
ROUTE_METHODS = tuple(m for m in SOURCE_FREE if ADAPT[m].learns_route)  # source-free methods that learn a route
ALIGN_ROUTE_METHODS = tuple(m for m in WITH_SOURCES if ADAPT[m].learns_route)  # with sources, the route alone
FULL_NETWORK_METHODS = tuple(m for m in WITH_SOURCES if not ADAPT[m].learns_route)  # with sources, every parameter


def setting(method: str) -> str:
    """What `method` adapts from: `source_free`, `with_sources` or `few_labels`."""
    return ADAPT[method].setting


def adapt(model: ModularNet, target: TaskData, method: str = "route_select", config: TrainConfig = ADAPT_TRAIN,
          out_dir: str | Path | None = None, progress: bool = True, sources: dict[str, TaskData] | None = None,
          labelled: TaskData | None = None, **options) -> AdaptResult:
    """Add the unlabelled `target` domain to `model` with one of the `ADAPT` methods, in place.

    Only `target.spec` and `target.x_train` are read, and under the `few_labels` methods
    `labelled` too; the target's own labels never are. Except under `m3sda`, `dann`, the
    route methods with `sources_train`, and the few-label `head` and `finetune`, pool, stem,
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
        sources: the labelled source domains by name (`with_sources` methods only).
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
    result = unit.run(Target(model, target.spec, target.x_train, names, config, out_dir, progress, sources, labelled,
                             options))
    model.requires_grad_(False)  # a route started by the method comes back trainable
    return result
