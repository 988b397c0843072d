"""Route regimes: named ways of learning routes, each a set of changes to a model config
and a training config.

    model, train = REGIMES["templates"].apply(ModelConfig(steps=8), TrainConfig())

| regime | pool | route start | how routes train |
| --- | --- | --- | --- |
| `annealed` | `N = 2L` modules | biased to the plain order 0 1 2 .. | temperature annealed, entropy penalty, discretised at 75% |
| `templates` | `K = L/2` templates | flat, uniform in +-1.1 | soft to the end, at the weights' learning rate |
| `templates_norms` | as `templates` | as `templates` | as `templates`; the modules own the norms' affine parameters |
| `templates_cyclic` | as `templates` | biased to `0 1 .. K-1 0 1 ..`: every template starts at `L/K` positions | as `templates` |
| `templates_swap` | as `templates` | as `templates` | as `templates`; half of the batches run with two steps' weights exchanged |
| `templates_permuted` | as `templates` | biased to `p p ..` for a random permutation `p` of the templates, drawn per task | as `templates` |
| `templates_permuted_swap` | as `templates` | as `templates_permuted` | as `templates_swap` |
| `templates_norms_swap` | as `templates` | as `templates` | as `templates_swap`; the modules own the norms' affine parameters |
| `annealed_swap` | as `annealed` | as `annealed` | as `annealed`; half of the batches run with two steps' weights exchanged |
| `random_routes` | `N = L` modules | as `annealed` | as `annealed`; half of the batches run a random route (a module per step drawn uniformly, repeats allowed) |

Over transformer blocks, routes that anneal start nearer one module (`route_init_scale` 4:
weight 0.78 of 16): a soft mixture of transformer blocks shrinks their residual branches (no
norm inside the branch re-scales a mixture, as the batch norm inside a convolution block
does), and at the convolution blocks' start (weight 0.15) a multi-task model did not leave
chance in 800 steps.

`templates` is the regime of the authors' research code (`googleinterns/loop-project`),
whose multi-task model shares `K < L` templates among all steps and keeps routes soft;
`templates_norms` adds what they also did with the norms. The others aim at modules
that serve several positions by other means: a shared cyclic start, exchanged steps, or
a start in a different order for every task (so each template serves different steps in
different tasks), alone or with exchanged steps. `templates_norms_swap` puts the two
together: a route that also moves every channel's scale and shift, over modules trained to
work at any position. `random_routes` trains every module at every position and after any
other, as LayerShuffle trains a ViT's layers in random orders and Mendez & Eaton train
modules under random compositions: a pool meant for route search. Which regime is the default is decided by
`isomod bench mtl` (docs/results/mtl-regimes.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from isomod.errors import IsomodError, check_choice
from isomod.core.network import ModelConfig
from isomod.training.trainer import TrainConfig


@dataclass(frozen=True)
class Regime:
    """A way of learning routes.

    Args:
        name: the regime's name.
        modules_per_step: pool size as a multiple of the route length `L` (2: a module per
            step and as many spare; 0.5: every template serves two steps on average).
        model: ModelConfig fields the regime sets.
        train: TrainConfig fields the regime sets.
        routes_at_weight_lr: route logits train at the weights' learning rate (`lr`), as
            the authors' did, instead of `lr_routes`.
        per_block: ModelConfig fields the regime sets instead over a block kind, by kind name.
    """

    name: str
    modules_per_step: float
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    routes_at_weight_lr: bool = False
    per_block: dict = field(default_factory=dict)

    def pool_size(self, steps: int) -> int:
        return max(1, round(self.modules_per_step * steps))

    def apply(self, model: ModelConfig, train: TrainConfig, modules: int | None = None
              ) -> tuple[ModelConfig, TrainConfig]:
        """`model` and `train` with the regime's fields; the pool holds `modules` modules
        (default: `modules_per_step * model.steps`)."""
        if modules is not None and modules < 1:
            raise IsomodError(f"a regime's pool needs at least 1 module, got {modules}")
        fields = {**self.model, **self.per_block.get(model.block, {})}
        model = replace(model, num_modules=modules or self.pool_size(model.steps), **fields)
        train = replace(train, **self.train)
        if self.routes_at_weight_lr:
            train = replace(train, lr_routes=train.lr)
        return model, train


TEMPLATE_MODEL = {"route_init": "flat", "route_init_scale": 1.1, "norm_affine": "step"}
REGIMES: dict[str, Regime] = {
    "annealed": Regime("annealed", 2.0, {"route_init": "cyclic", "route_init_scale": 1.0, "norm_affine": "step"},
                       {"routes": "annealed", "route_swap": 0.0}, per_block={"transformer": {"route_init_scale": 4.0}}),
    "templates": Regime("templates", 0.5, TEMPLATE_MODEL, {"routes": "soft", "route_swap": 0.0}, True),
    "templates_norms": Regime("templates_norms", 0.5, {**TEMPLATE_MODEL, "norm_affine": "module"},
                              {"routes": "soft", "route_swap": 0.0}, True),
    "templates_cyclic": Regime("templates_cyclic", 0.5, {**TEMPLATE_MODEL, "route_init": "cyclic"},
                               {"routes": "soft", "route_swap": 0.0}, True),
    "templates_swap": Regime("templates_swap", 0.5, TEMPLATE_MODEL, {"routes": "soft", "route_swap": 0.5}, True),
    "templates_permuted": Regime("templates_permuted", 0.5, {**TEMPLATE_MODEL, "route_init": "permutation"},
                                 {"routes": "soft", "route_swap": 0.0}, True),
    "templates_permuted_swap": Regime("templates_permuted_swap", 0.5, {**TEMPLATE_MODEL, "route_init": "permutation"},
                                      {"routes": "soft", "route_swap": 0.5}, True),
    "templates_norms_swap": Regime("templates_norms_swap", 0.5, {**TEMPLATE_MODEL, "norm_affine": "module"},
                                   {"routes": "soft", "route_swap": 0.5}, True),
    "annealed_swap": Regime("annealed_swap", 2.0, {"route_init": "cyclic", "route_init_scale": 1.0,
                                                  "norm_affine": "step"},
                            {"routes": "annealed", "route_swap": 0.5}, per_block={"transformer": {"route_init_scale": 4.0}}),
    "random_routes": Regime("random_routes", 1.0, {"route_init": "cyclic", "route_init_scale": 1.0,
                                                   "norm_affine": "step"},
                            {"routes": "annealed", "route_swap": 0.0, "route_random": 0.5},
                            per_block={"transformer": {"route_init_scale": 4.0}}),
}
DEFAULT_REGIME = "annealed"


def regime(name: str) -> Regime:
    """The regime called `name`."""
    check_choice("route regime", name, tuple(REGIMES))
    return REGIMES[name]
