"""A model's training forward passes through `torch.compile`, one graph for every task.

A compiled `model(x, task)` would read the task's name in its guards and compile again for
each task (the 9th hit torch's recompile limit and ran eagerly). Here the name is resolved
outside the compiled region: the compiled function takes the task's branch (its route and
norms, a module like every other task's) and runs a discrete route by indexing the pool's
stacked weights with the route's `choice` tensor, so tasks and routes of one shape share a
graph: one for soft routes, one for discrete ones. The head runs outside it (class counts
differ between tasks).
"""

from __future__ import annotations

import torch

from isomod.core.network import check_input

COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledForward:
    """`model`'s forward passes compiled with `backend` (and `mode`, empty for torch's
    default); parameters, routes and heads stay the model's, every other attribute is read
    from it."""

    def __init__(self, model, backend: str, mode: str = ""):
        self.model = model
        self.features = torch.compile(model.branch_features, backend=backend, **({"mode": mode} if mode else {}))

    def __call__(self, x: torch.Tensor, task: str, **options) -> torch.Tensor:
        return self.model.forward_head(self.forward_features(x, task, **options), task)

    def forward_features(self, x: torch.Tensor, task: str, step_order: torch.Tensor | None = None,
                         modules: list[int] | None = None) -> torch.Tensor:
        branch = self.model.branch(task)
        check_input(x, self.model.config)
        if modules is not None:
            self.model.check_modules(branch, modules)
            modules = torch.as_tensor(modules, dtype=torch.long)
        return self.features(x, branch, step_order, modules, indexed=True)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def compiled(model, backend: str, mode: str = ""):
    """`model`'s forward passes through `torch.compile`: a modular network's with one graph
    for every task (`CompiledForward`), any other model's as `torch.compile` gives it."""
    if hasattr(model, "branch_features"):
        return CompiledForward(model, backend, mode)
    return torch.compile(model, backend=backend, **({"mode": mode} if mode else {}))
