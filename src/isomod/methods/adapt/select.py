"""Choosing and self-training the target's route without its labels.

- `route_calibrated` (`with_sources`): the target's route chosen among a discrete set (every
  source route, and every single-cut recombination of two: the first steps of one, the rest
  of the other, each step with its own source's norms) by a label-free score; which score,
  is decided first by leaving each source out in turn and asking which score best ranks
  the other sources' candidates by their accuracy on it (Spearman correlation; the
  held-out source's labels are source labels, never the target's).
- `route_shot` (`source_free`): the target's route trained on its own pseudo-labels (SHOT,
  Liang et al. 2020: class centroids in feature space weighted by the predictions, then each
  image labelled by its nearest centroid), with information maximisation, in rounds that
  label again; statistics follow the route.

The label-free scores, each "higher is better": `im` (confident and diverse predictions),
`confidence` (mean top probability), `stats` (minus how far the target's statistics lie from
each step's source statistics) and `feature_gap` (minus the moment gap between the
target's features and the nearest source's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from isomod.methods.adapt.base import (ADAPT, AdaptResult, Target, add_as_copy, by_im, changed_numbers, entropy, marginal_entropy,
                          start_from_sources)
from isomod.methods.adapt.align import moment_gap, moments
from isomod.data.tasks import TaskData
from isomod.errors import IsomodError
from isomod.training.route_schedule import RouteSchedule
from isomod.training.trainer import Trainer, evaluate

SCORES = ("im", "confidence", "stats", "feature_gap")
SELECT_IMAGES = 1000  # images per domain a candidate is scored on


@dataclass(frozen=True)
class Candidate:
    """A discrete route with, for each of its `2L + 1` norms, the source whose norms it takes."""

    route: tuple[int, ...]
    norms_from: tuple[str, ...]

    @property
    def label(self) -> str:
        return " ".join(map(str, self.route))


def candidates(model, sources: list[str]) -> list[Candidate]:
    """Every source route, then every single-cut recombination of two sources' routes."""
    routes = {s: model.route(s).indices() for s in sources}
    steps = len(next(iter(routes.values())))
    out = [Candidate(tuple(routes[s]), (s,) * (2 * steps + 1)) for s in sources]
    for a in sources:
        for b in sources:
            for cut in range(1, steps) if a != b else ():
                out.append(Candidate(tuple(routes[a][:cut] + routes[b][cut:]),
                                     (a,) * (2 * cut) + (b,) * (2 * (steps - cut) + 1)))
    return list(dict.fromkeys(out))


def apply(model, task: str, candidate: Candidate, x: torch.Tensor) -> None:
    """Give `task` the candidate's norms and route, statistics re-estimated on `x`."""
    norms = model.branch(task).norms
    for i, source in enumerate(candidate.norms_from):
        norms[i].load_state_dict(model.branch(source).norms[i].state_dict())
    model.route(task).set_choice(list(candidate.route))
    model.estimate_stats(x, task)


def scores_of(model, task: str, candidate: Candidate, x: torch.Tensor, reference: dict) -> dict[str, float]:
    """Every label-free score of `task` as it stands (the candidate applied) on images `x`."""
    f = model.features(x, task)
    head = model.head_of(task)
    with torch.no_grad():
        logits = model.forward_head(f.to(head.weight.device), task).cpu()
    gap = [torch.zeros(())]  # layer norms (a transformer's) keep no statistics to compare
    for i, (mine, source) in enumerate(zip(model.branch(task).norms, candidate.norms_from)):
        if not getattr(mine, "track_running_stats", False):
            continue
        theirs = model.branch(source).norms[i]
        v1, v2 = mine.running_var + mine.eps, theirs.running_var + theirs.eps
        d2 = (mine.running_mean - theirs.running_mean) ** 2
        gap.append((0.5 * (v1 / v2 + v2 / v1 + d2 * (1 / v1 + 1 / v2)) - 1).mean())
    mt = moments(f)
    return {"im": -(entropy(logits) - marginal_entropy(logits)).item(),
            "confidence": torch.softmax(logits, -1).max(-1).values.mean().item(),
            "stats": -torch.stack(gap).mean().item(),
            "feature_gap": -min(moment_gap(mt, m).item() for m in reference.values())}


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denom if denom else 0.0


def sample(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed random `SELECT_IMAGES` of `x`'s items (the same ones for the same length and seed)."""
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(len(x), generator=g)[:SELECT_IMAGES]]


def calibrate(t: Target, reference: dict) -> dict[str, dict[str, float]]:
    """Per score: its mean Spearman correlation with accuracy over the candidates of the
    other sources on each held-out source, and the mean accuracy lost by taking its
    top-scored candidate instead of the best one (`regret`)."""
    if len(t.sources) < 3:
        raise IsomodError("calibrating a route score leaves one source out and recombines two others: it needs at "
                          f"least 3 source domains, the model has {len(t.sources)}")
    rho: dict[str, list[float]] = {s: [] for s in SCORES}
    regret: dict[str, list[float]] = {s: [] for s in SCORES}
    model, name = t.model, f"{t.spec.name}~calibration"
    for held in t.sources:
        data = t.source_data[held]
        x, y = sample(data.x_train, t.config.seed), sample(data.y_train, t.config.seed)
        probe = TaskData(replace(t.spec, name=name), x[:0], y[:0], x, y)
        others = [s for s in t.sources if s != held]
        add_as_copy(model, probe.spec, others[0])
        found = []
        for c in candidates(model, others):
            apply(model, name, c, x)
            found.append((scores_of(model, name, c, x, {s: reference[s] for s in others}),
                          evaluate(model, {name: probe})[name]))
        model.remove_task(name)
        accs = [a for _, a in found]
        for score in SCORES:
            values = [s[score] for s, _ in found]
            rho[score].append(spearman(values, accs))
            regret[score].append(max(accs) - accs[max(range(len(values)), key=values.__getitem__)])
    return {s: {"spearman": sum(rho[s]) / len(rho[s]), "regret": sum(regret[s]) / len(regret[s])} for s in SCORES}


@ADAPT.register("route_calibrated", "with_sources", "the target's discrete route chosen among the source routes and "
                "their recombinations by the label-free score that best ranked routes on held-out sources, with "
                "target statistics", sets_route=True,
                changes={"route", "norms", "statistics"})
def route_calibrated(t: Target) -> AdaptResult:
    missing = [n for n in t.sources if n not in (t.source_data or {})]
    if missing:
        raise IsomodError(f"route_calibrated calibrates on the labelled source domains; their data is missing for "
                          f"{', '.join(missing)} (pass `source_data`)")
    reference = {s: moments(t.model.features(sample(t.source_data[s].x_train, t.config.seed), s)) for s in t.sources}
    table = calibrate(t, reference)
    score = max(table, key=lambda s: table[s]["spearman"])
    x = sample(t.x, t.config.seed)
    add_as_copy(t.model, t.spec, t.sources[0])
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    ranked = []
    for c in candidates(t.model, t.sources):
        apply(t.model, t.spec.name, c, x)
        ranked.append((scores_of(t.model, t.spec.name, c, x, reference)[score], c))
    best = max(ranked, key=lambda r: r[0])[1]
    apply(t.model, t.spec.name, best, t.x)
    return AdaptResult("route_calibrated", best.norms_from[-1], score, {c.label: v for v, c in ranked},
                       changed_numbers(before, t.model), setting="with_sources",
                       info={"calibration": table, "candidates": len(ranked), "norms_from": list(best.norms_from)})


def pseudo_labels(model, x: torch.Tensor, task: str) -> torch.Tensor:
    """SHOT's labels: centroids of the normalised features weighted by the predicted class
    probabilities, each image given its nearest centroid's class (cosine), once refined
    with the centroids of those labels."""
    features = model.features(x, task)
    f = F.normalize(features, dim=1).double()  # (B, C)
    head = model.head_of(task)
    with torch.no_grad():
        p = torch.softmax(model.forward_head(features.to(head.weight.device), task).cpu(), -1).double()
    centroids = F.normalize(p.T @ f, dim=1)  # (K, C)
    labels = (f @ centroids.T).argmax(1)
    hard = F.one_hot(labels, p.shape[1]).double()
    centroids = F.normalize(hard.T @ f, dim=1)
    return (f @ centroids.T).argmax(1)


def shot_objective(model, x, y, task):
    """Cross-entropy on the pseudo-labels plus information maximisation."""
    logits = model(x, task)
    return (F.cross_entropy(logits, y) + entropy(logits) - marginal_entropy(logits)), logits


SHOT_ROUNDS = 2


@ADAPT.register("route_shot", "source_free", "the target's route (soft) trained on its own pseudo-labels (SHOT's "
                "feature centroids) with information maximisation, in rounds; statistics follow the route",
                learns_route=True, tunes=("lr_routes",), changes={"route", "statistics"})
def route_shot(t: Target) -> AdaptResult:
    source, scores = by_im(t)
    model, name = t.model, t.spec.name
    add_as_copy(model, t.spec, source)
    model.estimate_stats(t.x, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start_from_sources(model, name, t.sources, source)
    config = replace(t.config, steps=max(1, t.config.steps // SHOT_ROUNDS))
    agreement = []
    for round_ in range(SHOT_ROUNDS):
        labels = pseudo_labels(model, t.x, name)
        agreement.append(round(float((labels == predictions(model, t.x, name)).double().mean()), 5))
        data = TaskData(t.spec, t.x, labels, t.x[:0], labels[:0])
        Trainer(model, {name: data}, config, out_dir=t.out_dir, objective=shot_objective, progress=t.progress,
                params={"routes": [model.route(name).logits]}, routes=RouteSchedule.soft(),
                frozen_norm_stats=False).fit(force=round_ > 0)  # each round replaces the last one's checkpoint
        model.estimate_stats(t.x, name)
    soft = model.route(name).weights().detach().cpu().tolist()
    return AdaptResult("route_shot", source, "im", scores, changed_numbers(before, model), soft,
                       info={"pseudo_label_agreement": agreement})


def predictions(model, x: torch.Tensor, task: str) -> torch.Tensor:
    head = model.head_of(task)
    with torch.no_grad():
        return model.forward_head(model.features(x, task).to(head.weight.device), task).argmax(-1).cpu()

