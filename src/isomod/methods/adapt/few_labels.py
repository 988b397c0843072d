"""The `few_labels` setting of domain adaptation: a few labelled images of the target per
class beside all its unlabelled ones.

Every method starts where AdaBN ends (the source route and norms chosen by the IM score,
statistics re-estimated on every target image) and is given the same labelled images and
budget; after training, the target's statistics are re-estimated on every target image
(under the route it ends with). What each changes:

- `route`: the target's route logits (soft to the end, from a mixture of the source routes
  that favours the chosen one), its statistics following the route;
- `route_search`: a discrete route found by search (`isomod.methods.search`, the `head` proxy: the
  labels' likelihood under the shared head, which nothing fits), its statistics;
- `norm_patch`: the affine parameters of the target's norms (a model patch), AdaBN's
  statistics held while training; the shared head stays (transfer's `norm_head` trains a new
  head besides, hence its other name);
- `route_norms`: route logits and norms' affine parameters together;
- `head_only`: a copy of the shared head, the target's own, over frozen features (transfer's
  `head_only` in this setting);
- `finetune`: stem, pool, the target's norms and its own copy of the head.

`route`, `route_search`, `norm_patch` and `route_norms` leave pool, stem, the shared head
and every source bit-identical; `head_only` and `finetune` give the target its own head.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from isomod.methods.adapt.base import ADAPT, AdaptResult, Target, add_as_copy, by_im, changed_numbers, start_from_sources
from isomod.training.route_schedule import RouteSchedule
from isomod.methods.search import SearchConfig, search_route
from isomod.training.trainer import Trainer


def start_adabn(t: Target) -> tuple[str, dict[str, float], dict[str, torch.Tensor]]:
    """AdaBN's state: the IM-chosen source's route and norms, statistics on every target image;
    the source, every source's score, and the model's state there (to count what changes)."""
    source, scores = by_im(t)
    add_as_copy(t.model, t.spec, source)
    t.model.estimate_stats(t.x, t.spec.name)
    return source, scores, {k: v.clone() for k, v in t.model.state_dict().items()}


def train_labelled(t: Target, params: dict, frozen_norm_stats: bool = True, fixed_stats=(), restats: bool = True,
                   **budget) -> Trainer:
    """Train `params` on the target's labelled images with cross-entropy, a learned route
    soft to the end (as `route_oracle`'s), then (`restats`) re-estimate the target's
    statistics on every target image."""
    config = replace(t.config, **budget) if budget else t.config
    trainer = Trainer(t.model, {t.spec.name: t.labelled}, config, out_dir=t.out_dir, progress=t.progress,
                      train_tasks=[t.spec.name], params=params, frozen_norm_stats=frozen_norm_stats,
                      fixed_stats=list(fixed_stats), routes=RouteSchedule.soft())
    trainer.fit()
    if restats:
        t.model.estimate_stats(t.x, t.spec.name)
    return trainer


def result(t: Target, method: str, source: str, scores: dict, before: dict, **extra) -> AdaptResult:
    soft = t.model.route(t.spec.name)
    return AdaptResult(method, source, "im", scores, changed_numbers(before, t.model),
                       None if soft.is_discrete else soft.weights().detach().cpu().tolist(), setting="few_labels",
                       **extra)


def affine_params(t: Target) -> list[torch.nn.Parameter]:
    return [p for m in t.model.branch(t.spec.name).norms for p in m.parameters()]


@ADAPT.register("route", "few_labels", "the target's route logits (soft) and statistics, trained on the labelled "
                "target images", learns_route=True, tunes=("lr_routes",),
                changes={"route", "statistics"}, style=("o", "tab:red"))
def route(t: Target) -> AdaptResult:
    source, scores, before = start_adabn(t)
    start_from_sources(t.model, t.spec.name, t.sources, source)
    train_labelled(t, {"routes": [t.model.route(t.spec.name).logits]}, frozen_norm_stats=False)
    return result(t, "route", source, scores, before)


@ADAPT.register("route_search", "few_labels", "a discrete route found by search (isomod.methods.search; the proxy: the "
                "labelled images' likelihood under the shared head) and its statistics", learns_route=True,
                changes={"route", "statistics"}, searches=True, style=("*", "tab:brown"))
def route_search(t: Target) -> AdaptResult:
    source, scores, before = start_adabn(t)
    search = t.options.get("search") or SearchConfig(proxy="head", seed=t.config.seed)
    found = search_route(t.model, t.spec.name, t.x, t.labelled.x_train, t.labelled.y_train,
                         t.model.route(source).indices(), search)
    return result(t, "route_search", source, scores, before, info={
        "candidates": found.candidates, "search_seconds": found.seconds, "proxy_start": round(found.start_score, 5),
        "proxy_found": round(found.score, 5), "strategy": search.strategy, "proxy": search.proxy})


@ADAPT.register("norm_patch", "few_labels", "the affine parameters of the target's norms (AdaBN's statistics held "
                "while training)", tunes=("lr",), changes={"norms", "statistics"},
                baseline_for=("few_labels",), style=("D", "tab:green"))
def norm_patch(t: Target) -> AdaptResult:
    source, scores, before = start_adabn(t)
    train_labelled(t, {"norms": affine_params(t)}, fixed_stats=[t.model.branch(t.spec.name).norms])
    return result(t, "norm_patch", source, scores, before)


@ADAPT.register("route_norms", "few_labels", "the target's route logits and norms' affine parameters, statistics "
                "following the route", learns_route=True, tunes=("lr_routes", "lr"),
                changes={"route", "norms", "statistics"}, style=("P", "tab:orange"))
def route_norms(t: Target) -> AdaptResult:
    source, scores, before = start_adabn(t)
    start_from_sources(t.model, t.spec.name, t.sources, source)
    train_labelled(t, {"routes": [t.model.route(t.spec.name).logits], "norms": affine_params(t)},
                   frozen_norm_stats=False)
    return result(t, "route_norms", source, scores, before)


@ADAPT.register("head_only", "few_labels", "a copy of the shared head, the target's own, trained over frozen features",
                tunes=("lr_heads",), changes={"head"}, style=("s", "tab:purple"), formerly=("head",))
def head_only(t: Target) -> AdaptResult:
    source, scores, before = start_adabn(t)
    own = t.model.own_head(t.spec.name)
    train_labelled(t, {"heads": list(own.parameters())}, fixed_stats=[t.model.branch(t.spec.name).norms],
                   restats=False)
    return result(t, "head_only", source, scores, before)


@ADAPT.register("finetune", "few_labels", "stem, pool, the target's norms and its own copy of the head",
                tunes=("finetune_lr",), changes={"network", "norms", "head", "statistics"}, style=("^", "tab:purple"))
def finetune(t: Target) -> AdaptResult:
    source, scores, before = start_adabn(t)
    own = t.model.own_head(t.spec.name)
    params = {"stem": list(t.model.stem.parameters()), "pool": list(t.model.pool.parameters()),
              "norms": affine_params(t), "heads": list(own.parameters())}
    train_labelled(t, params, lr=t.options.get("finetune_lr", t.config.lr),
                   lr_heads=t.options.get("finetune_lr", t.config.lr_heads))
    return result(t, "finetune", source, scores, before)
