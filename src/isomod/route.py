"""Route: a task's choice of module at each step, soft then discrete; fixed route patterns;
and the schedules that say how routes train (annealed and discretised, or soft to the end)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from isomod.errors import IsomodError, check_choice

if TYPE_CHECKING:
    from isomod.train import TrainConfig

ROUTE_INITS = ("random", "flat", "uniform", "cyclic", "permutation")
UNUSABLE = -1e9  # the logit of a module a route never picks
PATTERNS = ("once", "cyclic", "block_repeat", "distinct")


def reuse_pattern(kind: str, num_modules: int, steps: int) -> list[int]:
    """A fixed route over `steps` steps: `once` and `distinct` run modules 0 .. steps-1
    (a pool of `steps` modules), `cyclic` runs 0 1 .. N-1 0 1 .., and `block_repeat`
    runs each of the `N` modules for about `steps / N` consecutive steps."""
    check_choice("route pattern", kind, PATTERNS)
    if kind in ("once", "distinct"):
        return list(range(steps))
    if kind == "cyclic":
        return [l % num_modules for l in range(steps)]
    return [l * num_modules // steps for l in range(steps)]


class Route(nn.Module):
    """Learnable logits over the pool at each of `L` steps.

    Soft: the weights at step `l` are `softmax(logits[l] / temperature)`. Discrete:
    `choice[l]` holds one module index per step (`-1` while soft) and the weights are
    one-hot. `discretize()` moves from the first to the second; the temperature is a
    buffer so that an annealing schedule survives a checkpoint.

    Args:
        steps: number of steps `L`.
        num_modules: pool size `N`.
        init: `random` (small Gaussian logits), `flat` (logits uniform in
            `[-init_scale, init_scale]`: the template regime's start, no module favoured
            by any step), `uniform` (all zero), `cyclic` (step
            `l` starts biased towards module `l mod N`), or `permutation` (step `l`
            starts biased towards `perm[l mod N]` for a random permutation of the pool,
            so different tasks start on different modules).
        init_scale: standard deviation of `random` logits, half-width of `flat` ones, or
            the bias of `cyclic` and `permutation`.
        temperature: initial softmax temperature.
    """

    def __init__(
        self,
        steps: int,
        num_modules: int,
        init: str = "random",
        init_scale: float = 0.1,
        temperature: float = 1.0,
    ):
        super().__init__()
        check_choice("route init", init, ROUTE_INITS)
        logits = torch.zeros(steps, num_modules)
        if init == "random":
            logits.normal_(0.0, init_scale)
        elif init == "flat":
            logits.uniform_(-init_scale, init_scale)
        elif init in ("cyclic", "permutation"):
            order = torch.arange(num_modules) if init == "cyclic" else torch.randperm(num_modules)
            logits[torch.arange(steps), order[torch.arange(steps) % num_modules]] = init_scale
        self.logits = nn.Parameter(logits)  # (L, N)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("choice", torch.full((steps,), -1, dtype=torch.long))  # (L,)
        self.step_order: torch.Tensor | None = None  # a training-time reordering of the soft weights' steps

    @classmethod
    def fixed(cls, pattern: Sequence[int], num_modules: int) -> "Route":
        """A route that is discrete from the start, e.g. `[0, 1, 2, 3, 0, 1, 2, 3]`."""
        route = cls(len(pattern), num_modules, init="uniform")
        route.set_choice(pattern)
        return route

    @property
    def steps(self) -> int:
        return self.logits.shape[0]

    @property
    def num_modules(self) -> int:
        return self.logits.shape[1]

    @property
    def is_discrete(self) -> bool:
        return bool((self.choice >= 0).all())

    def set_choice(self, pattern: Sequence[int]) -> None:
        """Make the route discrete with the given module index per step."""
        pattern = [int(p) for p in pattern]
        if len(pattern) != self.steps:
            raise IsomodError(f"a route pattern needs {self.steps} steps, got {len(pattern)}")
        if any(not 0 <= p < self.num_modules for p in pattern):
            raise IsomodError(f"route pattern {pattern} names a module outside 0..{self.num_modules - 1}")
        self.choice.copy_(torch.tensor(pattern, dtype=torch.long))
        self.logits.requires_grad_(False)

    def weights(self) -> torch.Tensor:
        """Route weights `(L, N)`, rows summing to one (one-hot once discrete)."""
        if self.is_discrete:
            return F.one_hot(self.choice, self.num_modules).to(self.logits.dtype)
        w = torch.softmax(self.logits / self.temperature, dim=-1)
        return w if self.step_order is None else w[self.step_order]

    @contextmanager
    def reordered(self, order: torch.Tensor):
        """Run a soft route with its steps' weights in `order` (a permutation of `0..L-1`)
        inside the block; gradients still reach the logits."""
        self.step_order = order
        try:
            yield self
        finally:
            self.step_order = None

    def entropy(self) -> torch.Tensor:
        """Mean entropy (nats) of the step weights; zero for a discrete route."""
        if self.is_discrete:
            return self.logits.new_zeros(())
        logp = torch.log_softmax(self.logits / self.temperature, dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()

    def support(self) -> torch.Tensor | None:
        """Indices of the modules this soft route can weight, or None when it can weight
        every module: modules added to the pool after the route (`add_modules`) get
        exactly zero weight, and leaving them out of the mixture keeps what the route
        computes bit-identical."""
        usable = self.logits[0] > UNUSABLE / 2
        return None if bool(usable.all()) else usable.nonzero().flatten()

    def discretize(self) -> None:
        """Freeze the route to its argmax at every step."""
        if not self.is_discrete:
            self.set_choice(self.logits.argmax(-1).tolist())

    def indices(self) -> list[int]:
        """The module chosen at each step (argmax while soft)."""
        return self.choice.tolist() if self.is_discrete else self.logits.argmax(-1).tolist()

    def add_modules(self, count: int) -> None:
        """Extend to a pool grown by `count` modules, which this route never picks."""
        # A large finite logit, not -inf: its weight underflows to exactly zero while
        # the entropy stays finite (0 * log 0 would be NaN).
        pad = self.logits.new_full((self.steps, count), UNUSABLE)
        grad = self.logits.requires_grad
        self.logits = nn.Parameter(torch.cat([self.logits.detach(), pad], 1), requires_grad=grad)

    def remove_module(self, index: int) -> None:
        """Drop module `index` from the pool; later indices move down by one."""
        if self.is_discrete and index in self.choice.tolist():
            raise IsomodError(f"module {index} is used by this route and cannot be removed")
        keep = [i for i in range(self.num_modules) if i != index]
        grad = self.logits.requires_grad
        self.logits = nn.Parameter(self.logits.detach()[:, keep].clone(), requires_grad=grad)
        if self.is_discrete:
            self.choice.sub_((self.choice > index).long())

    def __str__(self) -> str:
        text = " ".join(str(i) for i in self.indices())
        return text if self.is_discrete else f"{text} (soft, T={self.temperature.item():.3g})"


# --- how routes train -------------------------------------------------------------
ROUTE_SCHEDULES = ("annealed", "soft")


class RouteSchedule:
    """What happens to soft routes during training: their temperature and entropy weight
    at each step, and the step at which they are frozen to their argmax (None: never).

    This one anneals: the temperature falls geometrically from `temperature_start` to
    `temperature_end` until `discretize_at * steps`, where routes are discretised; the
    entropy of the route weights is added to the loss with `entropy_weight`. Pass another
    schedule (e.g. `SoftRoutes`) to the Trainer to keep routes soft.
    """

    def __init__(self, config: "TrainConfig"):
        self.start, self.end = config.temperature_start, config.temperature_end
        self.entropy = config.entropy_weight
        self.anneal_steps = round(config.discretize_at * config.steps)
        self.discretize_step = self.anneal_steps if self.anneal_steps < config.steps else None

    def temperature(self, step: int) -> float:
        frac = min(1.0, step / max(1, self.anneal_steps))
        return self.start * (self.end / self.start) ** frac

    def entropy_weight(self, step: int) -> float:
        return self.entropy


class SoftRoutes(RouteSchedule):
    """Routes stay soft to the end at temperature 1, with no entropy penalty."""

    def __init__(self, config: "TrainConfig | None" = None):
        self.start = self.end = 1.0
        self.entropy = 0.0
        self.anneal_steps, self.discretize_step = 1, None


def route_schedule(config: "TrainConfig") -> RouteSchedule:
    """The schedule `config.routes` names."""
    return SoftRoutes(config) if config.routes == "soft" else RouteSchedule(config)
