"""How routes train: what the one training loop asks at every step about the soft routes it
trains. The route itself (`isomod.core.route`) knows nothing of this.

The loop consults a `RouteSchedule` through five hooks:

- `temperature(step)`: written into every trained soft route before the step;
- `discretize_step`: the step at which the trained routes are frozen to their argmax
  (None: never);
- `penalty(step, routes)`: a term added to the loss (the routes' mean entropy), or None;
- `step_order(steps, generator)`: for one batch, an order of the route's steps whose
  weights the forward pass runs instead (two steps exchanged), or None;
- `random_route(steps, modules, generator)`: for one batch, a random module per step that
  the forward pass runs instead of the task's route, or None.

`RouteSchedule(...)` anneals: the temperature falls geometrically from
`temperature_start` to `temperature_end` until `discretize_at * steps`, where routes are
discretised. `RouteSchedule.soft()` keeps routes soft to the end at temperature 1 with no
entropy penalty (the template regime). Either may exchange steps (`swap`) or run random
routes (`random`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTE_SCHEDULES = ("annealed", "soft")


@dataclass(frozen=True)
class RouteSchedule:
    """A route schedule from plain numbers.

    Args:
        steps: the run's optimiser steps.
        temperature_start, temperature_end: softmax temperature of the route weights,
            annealed geometrically until the routes are discretised.
        entropy_weight: weight of the trained routes' mean entropy added to the loss.
        discretize_at: fraction of `steps` after which the trained routes are frozen to
            their argmax (1: never).
        swap: probability that a batch runs its task's route with two random steps'
            weights exchanged, so that modules must work at more than one position.
        random: probability that a batch runs a random discrete route (a module per step
            drawn uniformly, repeats allowed) instead of its task's route.
    """

    steps: int = 0
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    entropy_weight: float = 0.01
    discretize_at: float = 0.75
    swap: float = 0.0
    random: float = 0.0

    @classmethod
    def soft(cls, swap: float = 0.0, random: float = 0.0) -> "RouteSchedule":
        """Routes soft to the end, at temperature 1, with no entropy penalty."""
        return cls(0, 1.0, 1.0, 0.0, 1.0, swap, random)

    @property
    def anneal_steps(self) -> int:
        return round(self.discretize_at * self.steps)

    @property
    def discretize_step(self) -> int | None:
        return self.anneal_steps if self.anneal_steps < self.steps else None

    def temperature(self, step: int) -> float:
        frac = min(1.0, step / max(1, self.anneal_steps))
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** frac

    def penalty(self, step: int, routes: list) -> torch.Tensor | None:
        """`entropy_weight` times the mean entropy of the trained soft `routes` (None when
        there are none or the weight is zero)."""
        if not routes or self.entropy_weight <= 0:
            return None
        return self.entropy_weight * torch.stack([r.entropy() for r in routes]).mean()

    def step_order(self, steps: int, generator: torch.Generator) -> torch.Tensor | None:
        """With probability `swap`, the order `0..steps-1` with two random steps exchanged;
        otherwise None. Draws from `generator` whenever `swap` is non-zero and `steps > 1`
        (every data-parallel rank draws the same)."""
        if self.swap == 0 or steps < 2:
            return None
        draw = torch.rand(3, generator=generator)
        if draw[0] >= self.swap:
            return None
        i = int(draw[1] * steps)
        j = (i + 1 + int(draw[2] * (steps - 1))) % steps  # any step but i
        order = torch.arange(steps)
        order[i], order[j] = j, i
        return order

    def random_route(self, steps: int, modules: int, generator: torch.Generator) -> list[int] | None:
        """With probability `random`, a module per step drawn uniformly from `modules`
        (repeats allowed); otherwise None. Draws from `generator` whenever `random` is
        non-zero."""
        if self.random == 0:
            return None
        if float(torch.rand(1, generator=generator)) >= self.random:
            return None
        return torch.randint(modules, (steps,), generator=generator).tolist()
