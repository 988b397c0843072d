"""ModularNet: a shared stem, a pool of modules, and per task a route, norms and head.

    x -> stem -> step 1 .. step L -> norm, relu, global average pool -> head[task]

Step `l` of task `t` runs the pool under the route weights `w[t, l, :]` with the
normalisation layers of `(t, l)`: statistics belong to the route step, never to the
module, so re-ordering modules cannot mix up statistics. The norms' affine parameters
belong to the step (`norm_affine="step"`) or to the modules, mixed by the route like
their weights (`norm_affine="module"`, as the template regime's authors did).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from isomod.core import mixed, task_file
from isomod.core.blocks import KINDS, residual_branch, with_affine
from isomod.config import check_value, from_dict
from isomod.errors import IsomodError, check_choice, check_choices
from isomod.core.pool import BLOCKS, ModulePool
from isomod.core.route import ROUTE_INITS, Route
from isomod.core.spec import TaskSpec

MIXINGS = ("weight", "output")
NORM_AFFINES = ("step", "module")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a ModularNet's shape; saved as JSON with the weights.

    Args:
        in_channels: input image channels the stem takes.
        channels: width `C` of every module.
        num_modules: pool size `N`.
        steps: route length `L` (may exceed `N`).
        kernel_size: convolution size inside the modules.
        stem_stride: stride of the stem convolution (2 halves the resolution); from 3 on
            the stem cuts the image into stride x stride patches (e.g. 8 or 16 for 224-pixel
            ImageNet images, as isometric networks do).
        mixing: how a soft route is applied, `weight` (mix parameters, one block per
            step) or `output` (run every module with weight above `output_threshold`
            and mix outputs).
        route_init: initial route logits, see `Route`. The default `cyclic` starts
            every task on the plain order 0, 1, 2, ... with weight ~e^scale / (e^scale + N - 1)
            on it; near-uniform starts (`random`, `uniform`) make steps collapse onto
            a few repeated modules and train markedly worse.
        route_init_scale: scale of that initialisation.
        residual_scale: initial scale of each module's second convolution.
        output_threshold: smallest weight output mixing still runs a module for.
        norm_affine: who owns the scale and shift of the norms inside the steps: `step`
            (each task's step, with the statistics) or `module` (each module, mixed by the
            route with its weights; the steps keep only statistics). The norm before the
            head always belongs to the task.
        block: the modules' kind: `conv` (residual convolution blocks on feature maps, batch
            norms) or `transformer` (pre-norm self-attention and MLP blocks on the tokens of
            `stem_stride` x `stem_stride` patches, layer norms, a learned position embedding,
            mean pooling before the head).
        heads: attention heads of transformer blocks.
        mlp_ratio: the MLP width of transformer blocks, as a multiple of `channels`.
        image_size: the side of the square images a transformer's position embedding covers
            (`(image_size / stem_stride)^2` tokens); convolution blocks take any size.
    """

    in_channels: int = 1
    channels: int = 32
    num_modules: int = 8
    steps: int = 8
    kernel_size: int = 3
    stem_stride: int = 2
    mixing: str = "weight"
    route_init: str = "cyclic"
    route_init_scale: float = 1.0
    residual_scale: float = 0.5
    output_threshold: float = 1e-4
    norm_affine: str = "step"
    block: str = "conv"
    heads: int = 4
    mlp_ratio: int = 2
    image_size: int = 28

    def __post_init__(self):
        check_choice("mixing", self.mixing, MIXINGS)
        check_choice("norm affine owner", self.norm_affine, NORM_AFFINES)
        check_choice("route init", self.route_init, ROUTE_INITS)
        check_choice("block", self.block, BLOCKS)
        for name in ("in_channels", "channels", "num_modules", "steps", "stem_stride", "heads", "mlp_ratio",
                     "image_size"):
            if getattr(self, name) < 1:
                raise IsomodError(f"model config {name} must be >= 1, got {getattr(self, name)}")
        KINDS[self.block].check(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return from_dict(cls, data, "model config")


def make_stem(config: ModelConfig) -> nn.Module:
    """The stem of the config's block kind (`isomod.core.blocks.KINDS`)."""
    return KINDS[config.block].stem(config.in_channels, config.channels, config.stem_stride, config.image_size)


def make_norm(config_or_channels: "ModelConfig | int", affine: bool = True) -> nn.Module:
    """A norm of the config's block kind (batch norm over the global batch under data
    parallelism for convolution blocks, layer norm for transformer blocks); given a channel
    count, batch norm."""
    if isinstance(config_or_channels, int):
        return KINDS["conv"].norm(config_or_channels, affine)
    return KINDS[config_or_channels.block].norm(config_or_channels.channels, affine)


def make_pool(config: ModelConfig, num_modules: int | None = None) -> ModulePool:
    return ModulePool(num_modules or config.num_modules, config.channels, config.kernel_size, config.residual_scale,
                      norm_affine=config.norm_affine == "module", block=config.block, heads=config.heads,
                      mlp_ratio=config.mlp_ratio)


def pooled(config: ModelConfig, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The features the head reads `(B, C)`: the final norm, then the block kind's pooling
    (the mean over positions after a ReLU for feature maps; over tokens for a transformer)."""
    return KINDS[config.block].features(norm(h))


class TaskBranch(nn.Module):
    """What one task owns: its route, the norms of its `L` steps (statistics only when the
    modules own the affine parameters) plus the final norm, and its head unless the task
    shares its label space's head (then `head` is None)."""

    def __init__(self, spec: TaskSpec, config: ModelConfig, num_modules: int):
        super().__init__()
        self.route = Route(config.steps, num_modules, config.route_init, config.route_init_scale)
        step_affine = config.norm_affine == "step"
        self.norms = nn.ModuleList([make_norm(config, step_affine) for _ in range(2 * config.steps)]
                                   + [make_norm(config)])
        self.head = None if spec.label_space else nn.Linear(config.channels, spec.num_classes)


ROLES = ("stem", "pool", "routes", "norms", "heads")


class TaskModel(nn.Module):
    """The interface the trainer, the recipes, the benchmarks and the checkpoints rely on.

    Subclasses take `(config, tasks)`, set `self.config` and `self.specs` (task name ->
    TaskSpec) and implement `forward_features`, `forward_head`, `add_task`, `remove_task`,
    `param_groups`, `norm_layers` and `task_param_count`; they override `to_config` /
    `from_config` only when a checkpoint must hold more than shape and tasks. Route
    operations live on the models whose tasks own routes (`has_routes`); `require_routes`
    refuses the others in one line.
    """

    specs: dict[str, TaskSpec]
    has_routes = False  # whether tasks own routes (route operations, transfer, adaptation, export)

    @property
    def task_names(self) -> list[str]:
        return list(self.specs)

    def check_task(self, task: str) -> TaskSpec:
        if task not in self.specs:
            known = ", ".join(self.specs) or "none"
            raise IsomodError(f"unknown task {task!r}; this model has: {known}")
        return self.specs[task]

    def check_spec(self, spec: TaskSpec, config: "ModelConfig | int") -> None:
        """Refuse, in one line, a task this model cannot take (a name it has, another channel
        count, a label space of another class count, an image size a transformer does not
        cover)."""
        in_channels = config if isinstance(config, int) else config.in_channels
        if not isinstance(config, int) and KINDS[config.block].fixed_size and \
                tuple(spec.input_shape[1:]) != (config.image_size,) * 2:
            raise IsomodError(f"task {spec.name!r} has {spec.input_shape[1]}x{spec.input_shape[2]} images; this "
                              f"transformer's position embedding covers {config.image_size}x{config.image_size} "
                              "(ModelConfig.image_size)")
        if spec.name in self.specs:
            raise IsomodError(f"task {spec.name!r} already exists in this model")
        if not spec.name or "." in spec.name:
            raise IsomodError(f"task name {spec.name!r} must be non-empty and contain no '.'")
        if "." in spec.label_space:
            raise IsomodError(f"label space {spec.label_space!r} of task {spec.name!r} must contain no '.'")
        shared = [s for s in self.specs.values() if spec.label_space and s.label_space == spec.label_space]
        if shared and shared[0].num_classes != spec.num_classes:
            raise IsomodError(
                f"task {spec.name!r} has {spec.num_classes} classes but label space {spec.label_space!r} "
                f"(task {shared[0].name!r}) has {shared[0].num_classes}; domains of one label space share the classes"
            )
        if spec.input_shape[0] != in_channels:
            raise IsomodError(
                f"task {spec.name!r} has {spec.input_shape[0]}-channel inputs; "
                f"this model's stem takes {in_channels}"
            )

    def forward(self, x: torch.Tensor, task: str, **options) -> torch.Tensor:
        """Logits `(B, K)` of `x` under `task`; `options` go to `forward_features`."""
        return self.forward_head(self.forward_features(x, task, **options), task)

    def require_routes(self, what: str) -> None:
        """Refuse, in one line, a model whose tasks own no routes."""
        if not self.has_routes:
            raise IsomodError(f"{what} needs a model whose tasks own routes (a ModularNet), "
                              f"this one is a {type(self).__name__}")

    def add_task(self, spec: TaskSpec) -> None:
        """Create what a new task owns; nothing another task computes changes."""
        raise NotImplementedError

    def remove_task(self, task: str) -> None:
        raise NotImplementedError

    def param_groups(self, tasks: list[str] | None = None, roles: tuple[str, ...] | None = None,
                     include_frozen: bool = False) -> dict[str, list[nn.Parameter]]:
        """Parameters by role (`stem`, `pool`, `routes`, `norms`, `heads`): with `tasks`
        None, all that are trainable (with `include_frozen`, frozen ones too); otherwise
        only what those tasks own; with `roles`, only those roles. A discrete route's
        logits never count: it runs its choice."""
        check_choices("parameter role", roles or (), ROLES)
        groups = self._param_groups(tasks)
        if tasks is None and not include_frozen:
            groups = {k: [p for p in v if p.requires_grad] for k, v in groups.items()}
        return groups if roles is None else {k: v for k, v in groups.items() if k in roles}

    def _param_groups(self, tasks: list[str] | None) -> dict[str, list[nn.Parameter]]:
        """Parameters by role: with `tasks` None, every one the model has; otherwise what
        those tasks own."""
        raise NotImplementedError

    def norm_layers(self) -> list[nn.Module]:
        """Every normalisation layer; the trainer decides which keep their running statistics."""
        raise NotImplementedError

    @contextmanager
    def evaluating(self):
        """Inside the block every layer is in eval mode; each gets its own mode back after."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            yield self
        finally:
            for m, training in modes:
                m.training = training

    @torch.no_grad()
    def features(self, x: torch.Tensor, task: str, batch_size: int = 500) -> torch.Tensor:
        """Pooled features `(B, C)`, on the CPU, of uint8 images `x` under `task`, in eval mode."""
        device = next(self.parameters()).device
        with self.evaluating():
            return torch.cat([self.forward_features(to_float(x[i : i + batch_size].to(device)), task).cpu()
                              for i in range(0, len(x), batch_size)])

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to_config(self) -> dict:
        """The JSON-serialisable shape and tasks a checkpoint stores."""
        return {"model": asdict(self.config), "tasks": [asdict(s) for s in self.specs.values()]}

    @classmethod
    def from_config(cls, data: dict) -> "TaskModel":
        return cls(ModelConfig.from_dict(data["model"]), task_specs(data))


def task_specs(data: dict) -> list[TaskSpec]:
    """The checked task specs of a checkpoint's config."""
    tasks = check_value(data.get("tasks", []), list, "tasks")
    return [from_dict(TaskSpec, t, f"tasks[{i}]") for i, t in enumerate(tasks)]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images as floats in [0, 1]."""
    return x.float().div_(255.0)


def mix(w: torch.Tensor, stacks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each stacked module parameter `(N, ...)` mixed by route weights `(..., N)`: `(..., ...)`.
    In fp32 under a bf16 autocast too: the route's gradient passes through this product."""
    with torch.autocast(w.device.type, enabled=False):
        return {name: torch.tensordot(w.float(), stack.float(), dims=1) for name, stack in stacks.items()}


def check_input(x: torch.Tensor, config: "ModelConfig | int") -> None:
    in_channels = config if isinstance(config, int) else config.in_channels
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise IsomodError(f"expected input (B, {in_channels}, H, W), got {tuple(x.shape)}")
    if not isinstance(config, int) and KINDS[config.block].fixed_size and tuple(x.shape[2:]) != (config.image_size,) * 2:
        raise IsomodError(f"expected {config.image_size}x{config.image_size} images (this transformer's position "
                          f"embedding covers that size), got {x.shape[2]}x{x.shape[3]}")


class ModularNet(TaskModel):
    """Stem + pool of `N` modules + per-task routes over `L` steps + per-task heads.

    Args:
        config: the model's shape, see `ModelConfig`.
        tasks: tasks to create at once; more can be added with `add_task`.

    Example:
        >>> net = ModularNet(ModelConfig(channels=16, num_modules=4, steps=6),
        ...                  [TaskSpec("a", 10), TaskSpec("b", 5)])
        >>> logits = net(torch.randn(2, 1, 28, 28), "a")   # (2, 10)
        >>> net.discretize(); print(net.route_str("a"))
    """

    has_routes = True

    def __init__(self, config: ModelConfig, tasks: list[TaskSpec] = ()):
        super().__init__()
        self.config = config
        self.stem = make_stem(config)
        self.pool = make_pool(config)
        self.tasks = nn.ModuleDict()
        self.heads = nn.ModuleDict()  # label space -> the head its domains share
        self.specs: dict[str, TaskSpec] = {}
        for spec in tasks:
            self.add_task(spec)

    # --- tasks -------------------------------------------------------------------
    def add_task(self, spec: TaskSpec, source: str | None = None) -> TaskBranch:
        """Create a task's route, norms and head; nothing another task computes changes.

        Args:
            spec: the task's name, class count and input shape.
            source: an existing task whose norms (statistics included) and route the new
                task starts as a copy of; the route can then be given another start
                (`route(name).start_at(...)`).
        """
        self.check_spec(spec, self.config)
        source = self.branch(source) if source is not None else None
        device = self.stem.weight.device
        branch = TaskBranch(spec, self.config, len(self.pool)).to(device)
        if source is not None:
            branch.norms.load_state_dict(source.norms.state_dict())
            branch.route.copy_from(source.route)
        if spec.label_space and spec.label_space not in self.heads:
            self.heads[spec.label_space] = nn.Linear(self.config.channels, spec.num_classes).to(device)
        self.tasks[spec.name] = branch
        self.specs[spec.name] = spec
        return branch

    def forward(self, x: torch.Tensor, task: str | list[str], **options) -> torch.Tensor:
        """Logits `(B, K)` of `x` under `task`; given a list of task names, one per image
        (eval mode), logits `(B, K_max)`, `-inf` past each image's task's classes
        (`isomod.core.mixed`)."""
        if isinstance(task, (list, tuple)):
            check_input(x, self.config)
            return mixed.forward_mixed(self, x, list(task))
        return super().forward(x, task, **options)

    def new_branch(self, spec: TaskSpec) -> TaskBranch:
        """A fresh branch for `spec` on this pool, not added (what a task of it holds)."""
        return TaskBranch(spec, self.config, len(self.pool))

    # --- task files ----------------------------------------------------------------
    def pool_fingerprint(self) -> str:
        """SHA-256 over the stem's and the pool's weights: which pool a task file belongs to."""
        return task_file.pool_fingerprint(self)

    def save_task(self, task: str, folder, base: str = ""):
        """Write what `task` owns to `folder` (`task.safetensors`, `task.json`), with this
        pool's fingerprint and the name of the checkpoint it came from (`base`)."""
        return task_file.save_task(self, task, folder, base)

    def load_task(self, folder) -> str:
        """Add the task saved in `folder` (refused, in one line, unless it belongs to this
        pool and holds what a task of it holds); its name. No other task's outputs change."""
        return task_file.load_task(self, folder)

    def remove_task(self, task: str) -> None:
        """Delete a task's route, norms and own head (a shared head goes with its last
        domain); the pool and other tasks stay as they are."""
        space = self.check_task(task).label_space
        del self.tasks[task]
        del self.specs[task]
        if space and not any(s.label_space == space for s in self.specs.values()):
            del self.heads[space]

    def branch(self, task: str) -> TaskBranch:
        self.check_task(task)
        return self.tasks[task]

    def route(self, task: str) -> Route:
        return self.branch(task).route

    def head_of(self, task: str) -> nn.Linear:
        """The task's classifier: its own head, or the one its label space shares."""
        space = self.check_task(task).label_space
        return self.heads[space] if space else self.tasks[task].head

    def own_head(self, task: str) -> nn.Linear:
        """Give a domain its own copy of the head its label space shares (it leaves that
        label space; the other domains keep the shared head); a task with its own head keeps it."""
        spec = self.check_task(task)
        if not spec.label_space:
            return self.tasks[task].head
        head = copy.deepcopy(self.heads[spec.label_space])
        self.tasks[task].head = head
        self.specs[task] = replace(spec, label_space="")
        if not any(s.label_space == spec.label_space for s in self.specs.values()):
            del self.heads[spec.label_space]
        return head

    def shares_head(self, task: str) -> bool:
        """Whether another task runs the same head (a domain of the same label space)."""
        space = self.check_task(task).label_space
        return bool(space) and any(n != task and s.label_space == space for n, s in self.specs.items())

    # --- forward -----------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, task: str, step_order: torch.Tensor | None = None,
                         modules: list[int] | None = None) -> torch.Tensor:
        """Pooled features `(B, C)` of `x` `(B, C_in, H, W)` under `task`'s route.

        `step_order` (a permutation of `0..L-1`) runs step `l` with the route's choice or
        weights of step `step_order[l]`, its own norms unchanged (exchanged steps in
        training); gradients still reach the logits. `modules` (one pool index per step)
        runs those modules instead of the route, the task's norms unchanged (random routes
        in training); the route gets no gradient.
        """
        branch = self.branch(task)
        check_input(x, self.config)
        if modules is not None:
            self.check_modules(branch, modules)
        return self.branch_features(x, branch, step_order, modules)

    def check_modules(self, branch: TaskBranch, modules) -> None:
        """Refuse, in one line, a module list that is not one pool index per step."""
        modules = modules.tolist() if torch.is_tensor(modules) else modules
        if len(modules) != branch.route.steps or not all(0 <= m < len(self.pool) for m in modules):
            raise IsomodError(f"modules must name one of the {len(self.pool)} pool modules at each of the "
                              f"{branch.route.steps} steps, got {list(modules)}")

    def branch_features(self, x: torch.Tensor, branch: TaskBranch, step_order: torch.Tensor | None = None,
                        modules: list[int] | torch.Tensor | None = None, indexed: bool = False) -> torch.Tensor:
        """`forward_features` given the task's branch, its input checked. With `indexed`, a
        discrete route and `modules` (then a tensor) run by indexing the pool's stacked
        weights with the route's `choice` tensor, not by a module list in Python: what a
        compiled forward runs, so that one graph serves every task and route (the same
        numbers: a module's block is the same function of the same weights)."""
        h = self.stem(x)  # (B, C, H', W'), or tokens (B, T, C)
        route, norms = branch.route, branch.norms
        if modules is not None:
            if indexed:
                return self._indexed(h, modules, norms)
            for l, c in enumerate(modules):
                h = self.pool.blocks[c](h, norms[2 * l], norms[2 * l + 1])
            return pooled(self.config, h, norms[-1])
        if route.is_discrete:
            if indexed:
                return self._indexed(h, route.choice if step_order is None else route.choice[step_order], norms)
            chosen = route.chosen if step_order is None else [route.chosen[i] for i in step_order.tolist()]
            for l, c in enumerate(chosen):
                h = self.pool.blocks[c](h, norms[2 * l], norms[2 * l + 1])
            return pooled(self.config, h, norms[-1])
        order = None if step_order is None else step_order.to(route.logits.device)
        if self.config.mixing == "weight":
            mixed = self.mixed_params(route, order)
            # unbind, not index: one backward for all steps, not a zero-filled (L, ...) gradient per step
            steps = [dict(zip(mixed, ws)) for ws in zip(*(m.unbind(0) for m in mixed.values()))]
            for l in range(route.steps):
                h = self.pool.run(h, steps[l], norms[2 * l], norms[2 * l + 1])
        else:
            w = route.weights() if order is None else route.weights()[order]  # (L, N)
            mix = self._output_mix if KINDS[self.config.block].shares_first_norm else self._output_mix_blocks
            for l in range(route.steps):
                h = mix(h, w[l], norms[2 * l], norms[2 * l + 1])
        return pooled(self.config, h, norms[-1])  # (B, C)

    def _indexed(self, h: torch.Tensor, modules: torch.Tensor, norms: nn.ModuleList) -> torch.Tensor:
        """The pool's modules `modules` `(L,)` (an index tensor) run step by step on `h`."""
        stacks = self.pool.stacked()  # (N, ...) each
        steps = [dict(zip(stacks, ws)) for ws in zip(*(s[modules.to(s.device)].unbind(0) for s in stacks.values()))]
        for l, p in enumerate(steps):
            h = self.pool.run(h, p, norms[2 * l], norms[2 * l + 1])
        return pooled(self.config, h, norms[-1])

    def mixed_params(self, route: Route, step_order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every module parameter mixed by a soft route's weights at each step: `w1, w2`
        `(L, C, C, k, k)`, and with module-owned norm affine parameters `g1, b1, g2, b2`
        `(L, C)`. Only the modules the route can weight take part (see `Route.support`);
        `step_order` reorders the steps' weights."""
        w = route.weights()  # (L, N)
        if step_order is not None:
            w = w[step_order]
        stacks = self.pool.stacked()  # (N, ...) each
        keep = route.support()
        if keep is not None:
            w, stacks = w[:, keep], {name: stack[keep] for name, stack in stacks.items()}
        return mix(w, stacks)

    def _output_mix(self, h: torch.Tensor, w: torch.Tensor, norm1: nn.Module, norm2: nn.Module) -> torch.Tensor:
        # Exact soft ordering: every module with a non-negligible weight runs on the same
        # input; the kept weights are renormalised so a near one-hot route equals its module.
        # With weights summing to one, sum_n w_n (h + f_n(h)) = h + sum_n w_n f_n(h), so the
        # step's first norm runs once (each module then applies its own affine parameters,
        # when it owns them). Its second norm sees every kept module's activations.
        keep = (w > self.config.output_threshold).nonzero().flatten().tolist()
        total = w[keep].sum()
        a = norm1(h)  # (B, C, H, W)
        out = 0.0
        for n in keep:
            block = self.pool.blocks[n]
            if block.norm_affine:
                a_n = F.relu(a * block.g1[None, :, None, None] + block.b1[None, :, None, None])
                norm2_n = with_affine(norm2, block.g2, block.b2)
            else:
                a_n, norm2_n = F.relu(a), norm2
            out = out + (w[n] / total) * residual_branch(a_n, block.w1, block.w2, norm2_n)
        return h + out

    def _output_mix_blocks(self, h: torch.Tensor, w: torch.Tensor, norm1: nn.Module, norm2: nn.Module) -> torch.Tensor:
        # Exact soft ordering of whole blocks: every module with a non-negligible weight runs
        # on the same input, their outputs mixed by the renormalised kept weights.
        keep = (w > self.config.output_threshold).nonzero().flatten().tolist()
        total = w[keep].sum()
        return sum((w[n] / total) * self.pool.blocks[n](h, norm1, norm2) for n in keep)

    def forward_head(self, h: torch.Tensor, task: str) -> torch.Tensor:
        return self.head_of(task)(h)  # (B, K)

    # --- routes ------------------------------------------------------------------
    def soft_routes(self, tasks: list[str] | None = None) -> list[Route]:
        """The routes of `tasks` (default: all) that are still soft."""
        routes = [self.route(t) for t in (self.task_names if tasks is None else tasks)]
        return [r for r in routes if not r.is_discrete]

    def discretize(self, task: str | None = None) -> None:
        """Freeze one task's route (all tasks' when `task` is None) to its argmax."""
        for name in [task] if task is not None else self.task_names:
            self.route(name).discretize()

    def route_str(self, task: str) -> str:
        return f"{task}: {self.route(task)}"

    @torch.no_grad()
    def estimate_stats(self, x: torch.Tensor, task: str, batch_size: int = 256) -> None:
        """Replace the running statistics of `task`'s norms by their average over the uint8
        images `x` under its route (AdaBN); nothing else changes. Layer norms (a transformer's)
        keep no statistics: for them this does nothing."""
        norms = [m for m in self.branch(task).norms if getattr(m, "track_running_stats", False)]
        if not norms:
            return
        saved = [m.momentum for m in norms]
        device = self.stem.weight.device
        with self.evaluating():
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the batches
                m.train()
            for i in range(0, len(x), batch_size):
                self(to_float(x[i : i + batch_size].to(device)), task)
        for m, momentum in zip(norms, saved):
            m.momentum = momentum

    def stats_count(self, task: str) -> int:
        """How many running-statistics numbers `task`'s norms hold."""
        return sum(b.numel() for n, b in self.branch(task).norms.named_buffers() if "running" in n)

    def usage(self, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Route weights `(L, N)` of `tasks` (default: all), detached on the CPU."""
        return {name: self.route(name).weights().detach().cpu() for name in (self.task_names if tasks is None else tasks)}

    # --- pool operations ---------------------------------------------------------
    def add_modules(self, count: int = 1) -> list[int]:
        """Grow the pool by `count` trainable modules; existing routes never pick them."""
        indices = self.pool.add(count)
        for branch in self.tasks.values():
            branch.route.add_modules(count)
        return indices

    def remove_module(self, index: int) -> None:
        """Remove a module no discrete route uses; routes are renumbered."""
        users = [n for n in self.task_names if self.route(n).is_discrete and index in self.route(n).choice.tolist()]
        if users:
            raise IsomodError(f"module {index} is used by task(s) {', '.join(users)}; it cannot be removed")
        self.pool.remove(index)
        for branch in self.tasks.values():
            branch.route.remove_module(index)

    def freeze_shared(self) -> None:
        """Freeze the stem and every module of the pool."""
        self.stem.requires_grad_(False)
        self.pool.freeze()

    # --- parameters --------------------------------------------------------------
    def _param_groups(self, tasks: list[str] | None) -> dict[str, list[nn.Parameter]]:
        """With `tasks` None: stem, pool, soft routes, norms, heads. With `tasks`: what they
        own: their soft routes, step norms and heads (a shared head only when no other
        domain of its label space runs it)."""
        if tasks is None:
            return {
                "stem": list(self.stem.parameters()),
                "pool": list(self.pool.parameters()),
                "routes": [b.route.logits for b in self.tasks.values() if not b.route.is_discrete],
                "norms": [p for b in self.tasks.values() for p in b.norms.parameters()],
                "heads": [p for b in self.tasks.values() if b.head is not None for p in b.head.parameters()]
                + list(self.heads.parameters()),
            }
        groups = {"routes": [], "norms": [], "heads": []}
        for task in tasks:
            branch = self.branch(task)
            if not branch.route.is_discrete:
                groups["routes"].append(branch.route.logits)
            groups["norms"] += list(branch.norms.parameters())
            if not self.shares_head(task) or set(self.domains(task)) <= set(tasks):
                groups["heads"] += list(self.head_of(task).parameters())
        return {k: list(dict.fromkeys(v)) for k, v in groups.items()}

    def norm_layers(self) -> list[nn.Module]:
        return [m for branch in self.tasks.values() for m in branch.norms]

    def domains(self, task: str) -> list[str]:
        """The tasks that run `task`'s head: its label space's domains, or the task alone."""
        space = self.check_task(task).label_space
        return [n for n, s in self.specs.items() if s.label_space == space] if space else [task]

    def task_param_count(self, task: str) -> int:
        """Parameters a task owns: its route logits, step norms and own head (a shared
        head belongs to its label space, not to one domain)."""
        return sum(p.numel() for p in self.branch(task).parameters())

    def to_config(self) -> dict:
        return {
            "model": asdict(self.config),
            "num_modules_now": len(self.pool),
            "frozen_modules": self.pool.frozen(),
            "tasks": [asdict(s) for s in self.specs.values()],
            "routes": {n: self.route(n).indices() if self.route(n).is_discrete else None for n in self.task_names},
        }

    @classmethod
    def from_config(cls, data: dict) -> "ModularNet":
        model = cls(ModelConfig.from_dict(data["model"]))
        extra = check_value(data.get("num_modules_now", model.config.num_modules), int, "num_modules_now") - len(model.pool)
        if extra > 0:
            model.pool.add(extra)
        for _ in range(-extra):
            model.pool.remove(len(model.pool) - 1)
        for spec in task_specs(data):
            model.add_task(spec)
        routes = check_value(data.get("routes", {}), dict[str, list[int] | None], "routes")
        for name, pattern in routes.items():
            if pattern is not None:
                model.route(name).set_choice(pattern)
        frozen = [i for i, f in enumerate(check_value(data.get("frozen_modules", []), list[bool], "frozen_modules")) if f]
        if frozen:
            model.pool.freeze(frozen)
        return model
