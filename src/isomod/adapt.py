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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from isomod.transfer import task_features
from isomod.data.tasks import TaskData
from isomod.errors import IsomodError, check_choice
from isomod.logs import Progress, RunLog
from isomod.network import ModularNet, TaskSpec
from isomod.train import TrainConfig, Trainer, to_float

SOURCE_FREE = ("source_only", "adabn", "tent", "route_select", "route_entropy", "route_im")
WITH_SOURCES = ("route_moment", "route_adversarial", "m3sda", "dann")
ADAPT_METHODS = SOURCE_FREE + WITH_SOURCES
ROUTE_METHODS = ("route_entropy", "route_im")  # source-free methods that learn a route
ALIGN_ROUTE_METHODS = ("route_moment", "route_adversarial")  # with sources, the route alone
FULL_NETWORK_METHODS = ("m3sda", "dann")  # with sources, every parameter
MOMENT_METHODS = ("route_moment", "m3sda")  # the others align with a discriminator
ADAPT_TRAIN = TrainConfig(steps=300, batch_size=128, lr=1e-3, lr_routes=5e-2, lr_heads=0.0, weight_decay=0.0,
                          warmup_steps=20, augment=False, checkpoint_every=0, log_every=20)
MIN_TARGET_IMAGES = 64
SOURCE_FEATURE_IMAGES = 2000  # images per source whose frozen features the route methods align to
DISCRIMINATOR_HIDDEN = 64
# Weight of the alignment loss beside the sources' cross-entropy (m3sda, dann): chosen on
# validation images of two targets' training splits (digits5 mnist and mnistm, seed 0),
# where 0.1 beat 1.0 for both methods on both (m3sda 74.4 / 46.6 against 67.5 / 42.5).
ALIGN_WEIGHT = 0.1
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


@torch.no_grad()
def predict_logits(model: ModularNet, task: str, x: torch.Tensor) -> torch.Tensor:
    """Logits `(B, K)` of uint8 images `x` under `task`, in eval mode, on the CPU."""
    head = model.head_of(task)
    return model.forward_head(task_features(model, task, x).to(head.weight.device), task).cpu()


def im_score(model: ModularNet, task: str, x: torch.Tensor) -> float:
    """`entropy - marginal entropy` of the task's predictions on `x`; lower is better."""
    logits = predict_logits(model, task, x)
    return (entropy(logits) - marginal_entropy(logits)).item()


def stats_distance(model: ModularNet, task: str, source: str) -> float:
    """How far `task`'s norm statistics lie from `source`'s: the symmetric KL divergence
    between per-channel Gaussians, averaged over channels and norms. Run on the target
    with `source`'s route, it measures how alien the target looks to that route."""
    out = []
    for a, b in zip(model.branch(task).norms, model.branch(source).norms):
        v1, v2 = a.running_var + a.eps, b.running_var + b.eps
        d2 = (a.running_mean - b.running_mean) ** 2
        out.append((0.5 * (v1 / v2 + v2 / v1 + d2 * (1 / v1 + 1 / v2)) - 1).mean())
    return torch.stack(out).mean().item()


@torch.no_grad()
def estimate_norm_stats(model: ModularNet, task: str, x: torch.Tensor, batch_size: int = 256) -> None:
    """Replace the running statistics of `task`'s norms by their average over `x` (AdaBN)."""
    norms = [m for m in model.branch(task).norms if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        model(to_float(x[i : i + batch_size].to(device)), task)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)


# --- adaptation ---------------------------------------------------------------------
def setting(method: str) -> str:
    """`source_free` or `with_sources`: what `method` adapts from."""
    check_choice("adaptation method", method, ADAPT_METHODS)
    return "with_sources" if method in WITH_SOURCES else "source_free"


@dataclass
class AdaptResult:
    """One adaptation: the method, the source whose route (or whose norms) the target
    started from, every source's unsupervised score (`score`: `im` or `stats_distance`,
    lower is better), the numbers the adaptation changed (`params_task`; for the
    full-network methods, every number of the model that moved), the target's route
    weights (before discretising, or as kept when soft), whether the learned route was
    kept (source-free route methods), and the training log of the methods with sources
    (`history`: `step`, `align` and, where the network trains, `ce`)."""

    method: str
    source: str
    score: str
    scores: dict[str, float]
    params_task: int
    soft_route: list | None = None
    kept: bool | None = None  # route methods: whether the learned route beat its start
    setting: str = "source_free"
    history: list[dict] | None = None


def add_as_copy(model: ModularNet, spec: TaskSpec, source: str) -> None:
    """Add `spec` as a copy of `source`: its norms (statistics included) and its route,
    frozen. An earlier copy of the same name is replaced."""
    if spec.name in model.specs:
        model.remove_task(spec.name)
    branch = model.add_task(spec, copy_norms_from=source).requires_grad_(False)
    branch.route.load_state_dict(model.route(source).state_dict())


def _stats_count(model: ModularNet, task: str) -> int:
    return sum(b.numel() for n, b in model.branch(task).norms.named_buffers() if "running" in n)


def score_sources(model: ModularNet, spec: TaskSpec, x: torch.Tensor, sources: list[str],
                  score: Callable[[ModularNet, str, str], float]) -> dict[str, float]:
    """Every source's `score(model, target, source)`, with the target added as a copy of the
    source and statistics estimated on the target images `x`; leaves a copy of the last
    source as `spec`."""
    scores = {}
    for s in sources:
        add_as_copy(model, spec, s)
        estimate_norm_stats(model, spec.name, x)
        scores[s] = score(model, spec.name, s)
    return scores


def start_from_sources(model: ModularNet, task: str, sources: list[str], chosen: str) -> None:
    """Make `task`'s route soft, its logits biased towards every source's module at each
    step and most towards `chosen`'s, at temperature 1."""
    route = model.route(task)
    route.choice.fill_(-1)
    with torch.no_grad():
        route.temperature.fill_(1.0)
        route.logits.zero_()
        steps = torch.arange(route.steps)
        for s in sources:
            route.logits[steps, torch.tensor(model.route(s).indices())] = OTHER_SOURCE_BIAS
        route.logits[steps, torch.tensor(model.route(chosen).indices())] = SELECTED_BIAS


# --- alignment with the sources -----------------------------------------------------
def moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and second moment of features `(B, C)`."""
    return f.mean(0), f.pow(2).mean(0)


def moment_gap(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Squared distance between two feature distributions' first and second moments."""
    return 0.5 * ((a[0] - b[0]).pow(2).sum() + (a[1] - b[1]).pow(2).sum())


class _Reverse(torch.autograd.Function):
    """Identity forward; the gradient multiplied by `-scale` backward (DANN's layer)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _Reverse.apply(x, scale)


def dann_scale(progress: float) -> float:
    """DANN's ramp of the reversed gradient from 0 to 1 over training."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def domain_loss(disc: nn.Module, source: torch.Tensor, target: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """The discriminator's loss (sources labelled 0, target 1, each side weighted equally)
    on features that pass a gradient reversal layer, and its accuracy."""
    d_s, d_t = disc(reverse_gradient(source, scale)), disc(reverse_gradient(target, scale))
    loss = (F.binary_cross_entropy_with_logits(d_s, torch.zeros_like(d_s))
            + F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t)))
    acc = 0.5 * ((d_s < 0).float().mean() + (d_t > 0).float().mean())
    return loss, acc.item()


def changed_numbers(before: dict[str, torch.Tensor], model: ModularNet) -> int:
    """Floating-point numbers of `model`'s state that differ from `before`."""
    after = model.state_dict()
    return sum(int((before[k] != v).sum()) for k, v in after.items() if k in before and v.is_floating_point())


def _adapt_with_sources(model: ModularNet, spec: TaskSpec, x: torch.Tensor, names: list[str], method: str,
                        config: TrainConfig, sources: dict[str, TaskData] | None, out_dir: str | Path | None,
                        progress: bool) -> AdaptResult:
    missing = [n for n in names if n not in (sources or {})]
    if missing:
        raise IsomodError(f"method {method!r} adapts with the labelled source domains; their data is missing for "
                          f"{', '.join(missing)} (pass `sources`, a dict of TaskData by name)")
    device = next(model.parameters()).device
    feats = {s: task_features(model, s, sources[s].x_train[:SOURCE_FEATURE_IMAGES]).to(device) for s in names}
    reference = {s: moments(f) for s, f in feats.items()}

    def feature_gap(model: ModularNet, task: str, s: str) -> float:
        # The moment gap between the target's features under `s`'s route and `s`'s own.
        return moment_gap(moments(task_features(model, task, x[:SOURCE_FEATURE_IMAGES])), reference[s]).item()

    scores = score_sources(model, spec, x, names, feature_gap)
    source = min(scores, key=scores.get)
    add_as_copy(model, spec, source)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # the target equals its source here
    route_only = method in ALIGN_ROUTE_METHODS
    torch.manual_seed(config.seed)  # the discriminator's initial weights
    g = torch.Generator().manual_seed(config.seed)
    if route_only:
        start_from_sources(model, spec.name, names, source)
        route = model.route(spec.name)
        route.logits.requires_grad_(True)
        groups = [{"params": [route.logits], "base_lr": config.lr_routes}]
        nearest = feats[source]  # frozen: computed once
        nearest_moments = moments(nearest)
    else:
        model.requires_grad_(True)
        for n in model.task_names:
            if model.route(n).is_discrete:
                model.route(n).logits.requires_grad_(False)  # unused by a discrete route
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "base_lr": config.lr}]
    disc = None
    if method not in MOMENT_METHODS:
        c = model.config.channels
        disc = nn.Sequential(nn.Linear(c, DISCRIMINATOR_HIDDEN), nn.ReLU(), nn.Linear(DISCRIMINATOR_HIDDEN, 1)).to(device)
        groups.append({"params": list(disc.parameters()), "base_lr": config.lr})
    optimizer = torch.optim.AdamW([{**grp, "lr": grp["base_lr"]} for grp in groups], betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay)
    log = RunLog(None)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        log = RunLog(Path(out_dir) / "log.jsonl")
    bar = Progress(config.steps, 0, progress, desc=f"adapt {method}")
    per_source = max(1, config.batch_size // len(names))
    history = []
    for step in range(config.steps):
        for grp in optimizer.param_groups:
            grp["lr"] = grp["base_lr"] * config.lr_factor(step)
        if route_only:
            model.eval()
            model.branch(spec.name).norms.train()  # the target's statistics follow its route
        else:
            model.train()
        xt = to_float(x[torch.randint(len(x), (config.batch_size,), generator=g)].to(device))
        ft = model.forward_features(xt, spec.name)
        ce = None
        if route_only:
            fs = {source: nearest[torch.randint(len(nearest), (config.batch_size,), generator=g).to(device)]}
        else:
            fs, ce = {}, 0.0
            for s in names:
                idx = torch.randint(len(sources[s].y_train), (per_source,), generator=g)
                f = model.forward_features(to_float(sources[s].x_train[idx].to(device)), s)
                ce = ce + F.cross_entropy(model.forward_head(f, s), sources[s].y_train[idx].to(device)) / len(names)
                fs[s] = f
        record = {"step": step + 1}
        if method in MOMENT_METHODS:
            mt = moments(ft)
            if route_only:
                align = moment_gap(mt, nearest_moments)
            else:
                src = [moments(f) for f in fs.values()]
                align = sum(moment_gap(mt, m) for m in src) / len(src)
                pairs = list(combinations(src, 2))
                if pairs:  # M3SDA also pulls the sources together
                    align = align + sum(moment_gap(a, b) for a, b in pairs) / len(pairs)
        else:
            align, record["domain_acc"] = domain_loss(disc, torch.cat(list(fs.values())), ft,
                                                      dann_scale(step / config.steps))
        loss = align if ce is None else ce + ALIGN_WEIGHT * align
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record["align"] = round(align.item(), 6)
        if ce is not None:
            record["ce"] = round(ce.item(), 6)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            history.append(record)
            log.write(**record)
            bar.set_postfix(" ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
        bar.update()
    bar.close()
    log.close()
    model.requires_grad_(False)
    estimate_norm_stats(model, spec.name, x)
    model.eval()
    soft = model.route(spec.name).weights().detach().cpu().tolist() if route_only else None
    return AdaptResult(method, source, "feature_gap", scores, changed_numbers(before, model), soft,
                       setting="with_sources", history=history)


def adapt(model: ModularNet, target: TaskData, method: str = "route_select", config: TrainConfig = ADAPT_TRAIN,
          out_dir: str | Path | None = None, progress: bool = True,
          sources: dict[str, TaskData] | None = None) -> AdaptResult:
    """Add the unlabelled `target` domain to `model` with one of `ADAPT_METHODS`, in place.

    Only `target.spec` and `target.x_train` are read; the target's labels never are.
    Except under `m3sda` and `dann`, pool, stem, the shared head and every source domain
    stay bit-identical. The model is left with every parameter frozen.

    Args:
        model: a ModularNet trained on source domains of the target's label space.
        target: the new domain; its training images are the unlabelled adaptation data.
        method: one of `ADAPT_METHODS`.
        config: steps, batch size and learning rates of `tent` (`lr`) and the route
            methods (`lr_routes`, temperature schedule, `discretize_at`); with sources:
            `lr_routes` for the route, `lr` for the discriminator and, under `m3sda` and
            `dann`, for every parameter of the network; `batch_size` target images and
            as many source images (split evenly over the sources) per step.
        out_dir: run folder for the log and checkpoint of the trained methods.
        progress: show a progress bar.
        sources: the labelled source domains by name (`WITH_SOURCES` methods only).
    """
    check_choice("adaptation method", method, ADAPT_METHODS)
    spec, x = target.spec, target.x_train
    names = check_target(model, spec, len(x))
    model.requires_grad_(False)  # the model is left frozen, whatever the method
    if method in WITH_SOURCES:
        return _adapt_with_sources(model, spec, x, names, method, config, sources, out_dir, progress)
    if method == "route_select":
        score, scores = "stats_distance", score_sources(model, spec, x, names, stats_distance)
    else:
        score, scores = "im", {s: im_score(model, s, x) for s in names}
    source = min(scores, key=scores.get)
    add_as_copy(model, spec, source)
    if method == "source_only":
        return AdaptResult(method, source, score, scores, 0)
    estimate_norm_stats(model, spec.name, x)
    if method in ("adabn", "route_select"):
        return AdaptResult(method, source, score, scores, _stats_count(model, spec.name))
    branch = model.branch(spec.name)
    if method == "tent":
        params = {"norms": [p for m in branch.norms for p in m.parameters()]}
        objective, frozen_stats = entropy_objective, True
    else:
        route = branch.route
        start = (route.indices(), im_score(model, spec.name, x))  # the source route, target statistics
        start_from_sources(model, spec.name, names, source)
        params = {"routes": [route.logits]}
        objective = entropy_objective if method == "route_entropy" else im_objective
        frozen_stats = False  # statistics follow the route being learned
    trainer = Trainer(model, {spec.name: unlabelled(spec, x)}, config, out_dir=out_dir, objective=objective,
                      progress=progress, train_tasks=[spec.name], params=params, frozen_norm_stats=frozen_stats)
    trainer.fit()
    model.discretize(spec.name)
    estimate_norm_stats(model, spec.name, x)
    model.requires_grad_(False)
    kept = None
    if method in ROUTE_METHODS:
        # A route that collapsed onto a few classes scores worse than its start and is
        # undone. A confidently wrong route can still pass: IM is only a proxy.
        kept = im_score(model, spec.name, x) < start[1]
        if not kept:
            model.route(spec.name).set_choice(start[0])
            estimate_norm_stats(model, spec.name, x)
    soft = (trainer.soft_usage or {}).get(spec.name)
    changed = sum(p.numel() for ps in params.values() for p in ps) + _stats_count(model, spec.name)
    return AdaptResult(method, source, score, scores, changed, soft, kept)
