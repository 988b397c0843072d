"""Route search: a task's route found by scoring candidate discrete routes, not by descending
from a start.

Every candidate (one module per step) is scored the same way: the task's norm statistics
re-estimated on its images under that route (the affine parameters stay as they are), then
the pooled features of its labelled images scored by a proxy that does not fit anything to
the images it scores: the leave-one-out accuracy of a nearest-class-mean classifier
(`ncm`, cosine similarity) or of a closed-form ridge probe (`ridge`, leave-one-out through
the hat matrix), or, for a domain that shares a fixed head, the mean log-likelihood of the
labels under that head (`head`). Three strategies, measured against each other with the
same proxy:

- `greedy`: coordinate ascent from the start route, every module tried at every step in
  turn, `sweeps` times (or until a sweep changes nothing);
- `beam`: the steps in turn, every module tried at the step for each of the `beam` best
  routes so far, the `beam` best kept;
- `evolution`: a (1 + lambda) search, each generation mutating one or two steps of the best
  route so far, until the candidate budget is spent.

Each strategy stops at `max_candidates` distinct routes scored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from isomod.errors import IsomodError, check_choice

STRATEGIES = ("greedy", "beam", "evolution")
PROXIES = ("ncm", "ridge", "head")


@dataclass
class SearchConfig:
    """How a route is searched.

    Args:
        strategy: `greedy`, `beam` or `evolution`.
        proxy: `ncm` (leave-one-out nearest class mean), `ridge` (leave-one-out ridge probe)
            or `head` (the mean log-likelihood of the labels under the task's own head, which
            nothing fits: for a domain whose head is shared and fixed).
        sweeps: greedy passes over the steps.
        beam: routes kept per step by the beam search.
        max_candidates: distinct routes scored at most (every strategy).
        stats_images: the task's training images the statistics are estimated on (at most).
        proxy_images: labelled images the proxy scores (at most, a class-balanced sample).
        ridge: the ridge probe's penalty.
        seed: draws of the image samples and of the evolution's mutations.
    """

    strategy: str = "greedy"
    proxy: str = "ncm"
    sweeps: int = 2
    beam: int = 4
    max_candidates: int = 400
    stats_images: int = 1000
    proxy_images: int = 1000
    ridge: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_choice("search strategy", self.strategy, STRATEGIES)
        check_choice("search proxy", self.proxy, PROXIES)
        for name in ("sweeps", "beam", "max_candidates", "stats_images", "proxy_images"):
            if getattr(self, name) < 1:
                raise IsomodError(f"search {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SearchResult:
    """The route found, its proxy score, the start's, how many distinct routes were scored
    and how long it took; `trace`: the best score after each candidate; `scored`: every
    distinct route scored and its proxy, in the order they were scored; `stats_images` and
    `proxy_indices`: the images the statistics were estimated on and the indices of the
    labelled images the proxy scored (an analysis can score the same way)."""

    route: list[int]
    score: float
    start: list[int]
    start_score: float
    candidates: int
    seconds: float
    trace: list[float] = field(default_factory=list)
    scored: dict[tuple[int, ...], float] = field(default_factory=dict)
    stats_images: torch.Tensor | None = None
    proxy_indices: torch.Tensor | None = None


def ncm_loo(f: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Leave-one-out accuracy of a nearest-class-mean classifier (cosine) on features `(B, C)`;
    images alone in their class are not scored."""
    f = F.normalize(f.double(), dim=1)
    counts = torch.bincount(y, minlength=num_classes)
    usable = counts[y] > 1
    if not usable.any():
        raise IsomodError("a leave-one-out proxy needs two labelled images of some class")
    sums = torch.zeros(num_classes, f.shape[1], dtype=f.dtype).index_add_(0, y, f)  # (K, C)
    sim = f @ F.normalize(sums, dim=1).T  # (B, K)
    sim[torch.arange(len(y)), y] = (f * F.normalize(sums[y] - f, dim=1)).sum(1)  # own class without the image
    sim[:, counts == 0] = -2.0
    return (sim.argmax(1) == y)[usable].double().mean().item()


def ridge_loo(f: torch.Tensor, y: torch.Tensor, num_classes: int, penalty: float = 1.0) -> float:
    """Leave-one-out accuracy of a ridge regression onto one-hot labels (features
    standardised, a bias column), in closed form through the hat matrix."""
    f = f.double()
    f = (f - f.mean(0)) / (f.std(0) + 1e-6)
    x = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)  # (B, C + 1)
    targets = F.one_hot(y, num_classes).double()  # (B, K)
    gram = x.T @ x + penalty * torch.eye(x.shape[1], dtype=x.dtype)
    inv = torch.linalg.inv(gram)
    pred = x @ (inv @ (x.T @ targets))  # (B, K)
    h = ((x @ inv) * x).sum(1, keepdim=True)  # (B, 1) leverages
    loo = (pred - h * targets) / (1 - h).clamp(min=1e-6)
    return (loo.argmax(1) == y).double().mean().item()


@torch.no_grad()
def head_likelihood(model, task: str, f: torch.Tensor, y: torch.Tensor) -> float:
    """Mean log-likelihood of labels `y` under `task`'s head on features `f` `(B, C)`."""
    head = model.head_of(task)
    logits = model.forward_head(f.to(head.weight.device), task).double().cpu()
    return torch.log_softmax(logits, -1)[torch.arange(len(y)), y].mean().item()


def balanced_sample(y: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Indices of up to `size` items, as many of each class as fit (sorted)."""
    if len(y) <= size:
        return torch.arange(len(y))
    classes = torch.unique(y)
    per = max(1, size // len(classes))
    idx = [torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per]] for c in classes]
    return torch.cat(idx).sort().values


class RouteScorer:
    """Scores discrete routes of `task` in `model` (in place: it sets the task's route and
    statistics), each route once; `scored` counts the distinct routes."""

    def __init__(self, model, task: str, x_stats: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 num_classes: int, config: SearchConfig):
        self.model, self.task, self.config = model, task, config
        self.x_stats, self.x, self.y, self.k = x_stats, x, y, num_classes
        self.cache: dict[tuple[int, ...], float] = {}
        self.trace: list[float] = []

    @property
    def scored(self) -> int:
        return len(self.cache)

    def __call__(self, route: list[int]) -> float:
        key = tuple(route)
        if key not in self.cache:
            self.model.route(self.task).set_choice(route)
            self.model.estimate_stats(self.x_stats, self.task)
            f = self.model.features(self.x, self.task)
            if self.config.proxy == "ncm":
                proxy = ncm_loo(f, self.y, self.k)
            elif self.config.proxy == "ridge":
                proxy = ridge_loo(f, self.y, self.k, self.config.ridge)
            else:
                proxy = head_likelihood(self.model, self.task, f, self.y)
            self.cache[key] = proxy
            self.trace.append(max(self.trace[-1], proxy) if self.trace else proxy)
        return self.cache[key]

    def spent(self) -> bool:
        return self.scored >= self.config.max_candidates


def _better(score: Callable, a: list[int], b: list[int]) -> bool:
    """Whether `a` scores strictly above `b` (ties keep `b`, the incumbent)."""
    return score(a) > score(b)


def greedy(score: RouteScorer, start: list[int], num_modules: int, config: SearchConfig) -> list[int]:
    best = list(start)
    for _ in range(config.sweeps):
        changed = False
        for step in range(len(best)):
            for m in range(num_modules):
                if score.spent():
                    return best
                candidate = best[:step] + [m] + best[step + 1:]
                if _better(score, candidate, best):
                    best, changed = candidate, True
        if not changed:
            break
    return best


def beam(score: RouteScorer, start: list[int], num_modules: int, config: SearchConfig) -> list[int]:
    kept = [list(start)]
    for step in range(len(start)):
        pool = {tuple(r[:step] + [m] + r[step + 1:]) for r in kept for m in range(num_modules)}
        ranked = []
        for r in sorted(pool):
            if score.spent() and r not in score.cache:
                continue
            ranked.append((score(list(r)), r))
        ranked.sort(key=lambda t: (-t[0], t[1]))
        kept = [list(r) for _, r in ranked[: config.beam]] or kept
    return max(kept, key=score)


def evolution(score: RouteScorer, start: list[int], num_modules: int, config: SearchConfig) -> list[int]:
    g = torch.Generator().manual_seed(config.seed)
    best = list(start)
    score(best)
    stale = 0
    while not score.spent() and stale < 20 * len(start) * num_modules:
        child = list(best)
        for _ in range(1 + int(torch.rand(1, generator=g) < 0.5)):
            step = int(torch.randint(len(child), (1,), generator=g))
            child[step] = int(torch.randint(num_modules, (1,), generator=g))
        before = score.scored
        if _better(score, child, best):
            best = child
        stale = stale + 1 if score.scored == before else 0
    return best


SEARCHES = {"greedy": greedy, "beam": beam, "evolution": evolution}


def search_route(model, task: str, x_stats: torch.Tensor, x: torch.Tensor, y: torch.Tensor, start: list[int],
                 config: SearchConfig = SearchConfig()) -> SearchResult:
    """Search `task`'s discrete route in `model` from `start` (see the module's docstring).

    Args:
        model: a ModularNet holding `task`; its route and statistics are left at the best
            route found, everything else as it was.
        task: the task whose route is searched; its norms' affine parameters stay fixed.
        x_stats: the task's (unlabelled) images its statistics are estimated on.
        x, y: labelled images and their labels, which the proxy scores.
        start: the route the search starts from (the source's).
        config: strategy, proxy and budget.
    """
    model.require_routes("route search")
    g = torch.Generator().manual_seed(config.seed)
    x_stats = x_stats[torch.randperm(len(x_stats), generator=g)[: config.stats_images]]
    keep = balanced_sample(y, config.proxy_images, g)
    k = model.specs[task].num_classes
    scorer = RouteScorer(model, task, x_stats, x[keep], y[keep], k, config)
    t0 = time.time()
    start_score = scorer(list(start))
    best = SEARCHES[config.strategy](scorer, list(start), len(model.pool), config)
    best_score = scorer(best)
    model.route(task).set_choice(best)
    model.estimate_stats(x_stats, task)
    return SearchResult(best, best_score, list(start), start_score, scorer.scored, round(time.time() - t0, 2),
                        scorer.trace, dict(scorer.cache), x_stats, keep)
