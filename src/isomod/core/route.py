"""Route: a task's choice of module at each step, soft then discrete.

How routes *train* (temperature, entropy penalty, discretisation, exchanged steps) is the
training side's business (`isomod.training.route_schedule`); this file is only the route."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from isomod.errors import IsomodError, check_choice

ROUTE_INITS = ("random", "flat", "uniform", "cyclic", "permutation")
UNUSABLE = -1e9  # the logit of a module a route never picks


def _after_load(route: "Route", keys) -> None:
    route._sync()


class Route(nn.Module):
    """Learnable logits over the pool at each of `L` steps.

    Soft: the weights at step `l` are `softmax(logits[l] / temperature)`. Discrete:
    `choice[l]` holds one module index per step (`-1` while soft) and the weights are
    one-hot. `discretize()` moves from the first to the second; the temperature is a
    buffer so that an annealing schedule survives a checkpoint.

    What a forward pass branches on (whether the route is discrete, its modules, which
    modules a soft route can weight) is also kept in Python, updated by every verb and by
    loading a state, so a training step reads no tensor value from the device.

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
        self.chosen: list[int] | None = None  # `choice` in Python once discrete
        self._support: torch.Tensor | None = None  # the modules a soft route can weight, None: all
        self.register_load_state_dict_post_hook(_after_load)

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
        return self.chosen is not None

    def _sync(self) -> None:
        """Read `choice` and the logits' unusable modules into Python (after a state was
        loaded or the tensors were written): never in a training step."""
        chosen = self.choice.tolist()
        self.chosen = chosen if all(c >= 0 for c in chosen) else None
        usable = self.logits[0] > UNUSABLE / 2
        self._support = None if bool(usable.all()) else usable.nonzero().flatten()

    def set_choice(self, pattern: Sequence[int]) -> None:
        """Make the route discrete with the given module index per step."""
        pattern = [int(p) for p in pattern]
        if len(pattern) != self.steps:
            raise IsomodError(f"a route pattern needs {self.steps} steps, got {len(pattern)}")
        if any(not 0 <= p < self.num_modules for p in pattern):
            raise IsomodError(f"route pattern {pattern} names a module outside 0..{self.num_modules - 1}")
        self.choice.copy_(torch.tensor(pattern, dtype=torch.long))
        self.chosen = pattern
        self.logits.requires_grad_(False)

    def start_at(self, *biases: tuple[Sequence[int], float], temperature: float = 1.0) -> None:
        """Make the route soft and trainable from a biased start: logits zero, then for each
        `(pattern, bias)` in turn the logit of `pattern[l]` at step `l` set to `bias` (a
        later pair wins where two name the same module), at `temperature`."""
        with torch.no_grad():
            self.logits.zero_()
            steps = torch.arange(self.steps)
            for pattern, bias in biases:
                self.logits[steps, torch.as_tensor(list(pattern), dtype=torch.long)] = bias
            self.temperature.fill_(temperature)
            self.choice.fill_(-1)
        self._sync()
        self.logits.requires_grad_(True)

    def set_logits(self, logits: torch.Tensor, temperature: float = 1.0) -> None:
        """Make the route soft and trainable with the given logits `(L, N)`."""
        if tuple(logits.shape) != tuple(self.logits.shape):
            raise IsomodError(f"route logits must be {tuple(self.logits.shape)}, got {tuple(logits.shape)}")
        with torch.no_grad():
            self.logits.copy_(logits)
            self.temperature.fill_(temperature)
            self.choice.fill_(-1)
        self._sync()
        self.logits.requires_grad_(True)

    def copy_from(self, other: "Route") -> None:
        """Become a copy of `other`: its logits, temperature and choice (discrete or soft)."""
        self.load_state_dict(other.state_dict())
        self.logits.requires_grad_(not self.is_discrete)

    def weights(self) -> torch.Tensor:
        """Route weights `(L, N)`, rows summing to one (one-hot once discrete)."""
        if self.is_discrete:
            return F.one_hot(self.choice, self.num_modules).to(self.logits.dtype)
        return torch.softmax(self.logits / self.temperature, dim=-1)

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
        if self._support is not None and self._support.device != self.logits.device:
            self._support = self._support.to(self.logits.device)
        return self._support

    def discretize(self) -> None:
        """Freeze the route to its argmax at every step."""
        if not self.is_discrete:
            self.set_choice(self.logits.argmax(-1).tolist())

    def indices(self) -> list[int]:
        """The module chosen at each step (argmax while soft)."""
        return list(self.chosen) if self.is_discrete else self.logits.argmax(-1).tolist()

    def add_modules(self, count: int) -> None:
        """Extend to a pool grown by `count` modules, which this route never picks."""
        # A large finite logit, not -inf: its weight underflows to exactly zero while
        # the entropy stays finite (0 * log 0 would be NaN).
        pad = self.logits.new_full((self.steps, count), UNUSABLE)
        grad = self.logits.requires_grad
        self.logits = nn.Parameter(torch.cat([self.logits.detach(), pad], 1), requires_grad=grad)
        self._sync()

    def remove_module(self, index: int) -> None:
        """Drop module `index` from the pool; later indices move down by one."""
        if self.is_discrete and index in self.chosen:
            raise IsomodError(f"module {index} is used by this route and cannot be removed")
        keep = [i for i in range(self.num_modules) if i != index]
        grad = self.logits.requires_grad
        self.logits = nn.Parameter(self.logits.detach()[:, keep].clone(), requires_grad=grad)
        if self.is_discrete:
            self.choice.sub_((self.choice > index).long())
        self._sync()

    def __str__(self) -> str:
        text = " ".join(str(i) for i in self.indices())
        return text if self.is_discrete else f"{text} (soft, T={self.temperature.item():.3g})"
