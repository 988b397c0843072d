"""The methods with the labelled source domains at hand (`with_sources`, pass `source_data`): the
target's route is trained to make the target's features (the pooled features the head reads)
look like the sources':

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

Their target starts as a copy of the nearest source (route and norms). The alignment
losses are objectives (`isomod.methods.adapt.align`) given to the one `Trainer`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from isomod.core.network import ModularNet
from isomod.errors import IsomodError
from isomod.methods.adapt.align import SourceAlignment, moment_gap, moments
from isomod.methods.adapt.base import (ADAPT, SOURCE_FEATURE_IMAGES, AdaptResult, Target, add_as_copy,
                                       changed_numbers, score_sources, start_from_sources, unlabelled)
from isomod.training.route_schedule import RouteSchedule
from isomod.training.trainer import Trainer
from isomod import seeds


def nearest_source(t: Target) -> tuple[str, dict[str, float], dict[str, torch.Tensor]]:
    """The source whose route, run on the target with statistics estimated there, gives
    features whose moments lie closest to that source's own (`feature_gap`); every
    source's gap; and the sources' frozen features."""
    missing = [n for n in t.sources if n not in (t.source_data or {})]
    if missing:
        raise IsomodError(f"this method adapts with the labelled source domains; their data is missing for "
                          f"{', '.join(missing)} (pass `source_data`, a dict of TaskData by name)")
    device = next(t.model.parameters()).device
    feats = {s: t.model.features(t.source_data[s].x_train[:SOURCE_FEATURE_IMAGES], s).to(device) for s in t.sources}
    reference = {s: moments(f) for s, f in feats.items()}

    def feature_gap(model: ModularNet, task: str, s: str) -> float:
        return moment_gap(moments(model.features(t.x[:SOURCE_FEATURE_IMAGES], task)), reference[s]).item()

    scores = score_sources(t.model, t.spec, t.x, t.sources, feature_gap)
    return min(scores, key=scores.get), scores, feats


def align_with_sources(t: Target, method: str, align: str, route_alone: bool) -> AdaptResult:
    """The target aligned with the sources by `align` (see `isomod.methods.adapt.align`): its route alone
    towards the nearest source's frozen features, or the whole network with every source's
    cross-entropy, or (`sources_train` in the options, route methods) its route while stem,
    pool, head and the sources keep training on the sources' labels; then its statistics
    re-estimated."""
    source, scores, feats = nearest_source(t)
    model, name = t.model, t.spec.name
    add_as_copy(model, t.spec, source)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # the target equals its source here
    config = replace(t.config, batch_order="random", augment=False)
    seeds.seed(config.seed)  # the discriminator's initial weights
    sources_train = route_alone and bool(t.options.get("sources_train"))
    channels = model.config.channels
    if route_alone:
        start_from_sources(model, name, t.sources, source)
    if sources_train:
        params = network_params(model, exclude=name)
        params["routes"] = params.get("routes", []) + [model.route(name).logits]
        config = replace(config, lr_heads=config.lr)
        objective = SourceAlignment(align, t.sources, config.batch_size, channels, target_logits=model.route(name).logits)
    elif route_alone:
        params = {"routes": [model.route(name).logits]}
        objective = SourceAlignment(align, [source], config.batch_size, channels, bank=feats[source])
    else:
        params = model.param_groups(include_frozen=True)
        config = replace(config, lr_heads=config.lr)  # every number of the network trains at one rate
        objective = SourceAlignment(align, t.sources, config.batch_size, channels)
    trainer = Trainer(model, {name: unlabelled(t.spec, t.x), **{s: t.source_data[s] for s in t.sources}}, config,
                      out_dir=t.out_dir, objective=objective, progress=t.progress, train_tasks=[name],
                      params=params, routes=RouteSchedule.soft(), frozen_norm_stats=False)
    trainer.fit()
    model.estimate_stats(t.x, name)
    soft = model.route(name).weights().detach().cpu().tolist() if route_alone else None
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
                "to the nearest source's", learns_route=True, tunes=("lr_routes",),
                changes={"route", "statistics"})
def route_moment(t: Target) -> AdaptResult:
    return align_with_sources(t, "route_moment", "moment", route_alone=True)


@ADAPT.register("route_adversarial", "with_sources", "the target's route alone, trained through a reversed gradient "
                "to fool a discriminator of the nearest source's features from the target's", learns_route=True,
                tunes=("lr_routes",), changes={"route", "statistics"})
def route_adversarial(t: Target) -> AdaptResult:
    return align_with_sources(t, "route_adversarial", "adversarial", route_alone=True)


@ADAPT.register("m3sda", "with_sources", "every number of the network: the sources' cross-entropy plus moment "
                "matching of target and sources (M3SDA)", tunes=("lr",),
                changes={"network", "statistics", "norms"}, baseline_for=("with_sources",))
def m3sda(t: Target) -> AdaptResult:
    return align_with_sources(t, "m3sda", "moment", route_alone=False)


@ADAPT.register("dann", "with_sources", "every number of the network: the sources' cross-entropy plus a domain "
                "discriminator behind gradient reversal (DANN)", tunes=("lr",),
                changes={"network", "statistics", "norms"}, baseline_for=("with_sources",))
def dann(t: Target) -> AdaptResult:
    return align_with_sources(t, "dann", "adversarial", route_alone=False)
