"""A training run's budget and schedule (`TrainConfig`, written as `train_config.json`), the
route schedule it names, and the device it asks for."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from isomod import distributed
from isomod.config import from_dict
from isomod.errors import IsomodError, check_choice
from isomod.core.network import TaskModel
from isomod.training.compiled import COMPILE_MODES, compiled
from isomod.training.route_schedule import ROUTE_SCHEDULES, RouteSchedule

SCHEDULES = ("cosine", "step", "constant")
SAMPLINGS = ("uniform", "proportional")
BATCH_ORDERS = ("epochs", "random")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """A training run's budget and schedule; written as `train_config.json` in the run folder.

    Args:
        steps: optimiser steps.
        batch_size: images per task-homogeneous batch, over all data-parallel processes
            (each of `P` processes runs its share, about `batch_size / P`).
        tasks_per_step: tasks (one batch each) whose losses are summed in one step.
        sampling: `uniform` over tasks or `proportional` to their training-set sizes.
        batch_order: `epochs` (each task's images shuffled once per pass, batches taken in
            turn) or `random` (every batch drawn with replacement).
        lr: learning rate of stem, pool and norms.
        lr_routes: learning rate of route logits.
        lr_heads: learning rate of the heads.
        weight_decay: AdamW decay of stem, pool and heads (never routes or norms).
        schedule: `cosine` (after a linear warm-up), `step` (x0.1 at 50% and 75%) or `constant`.
        warmup_steps: linear warm-up length.
        routes: `annealed` (the temperature falls from `temperature_start` to
            `temperature_end`, the entropy penalty pushes routes to one-hot, and they are
            discretised at `discretize_at`) or `soft` (routes stay soft to the end at
            temperature 1, with no entropy penalty: the template regime).
        temperature_start, temperature_end: route softmax temperature, annealed
            geometrically until routes are discretised.
        entropy_weight: weight of the mean route entropy added to the loss.
        discretize_at: fraction of `steps` after which every route is frozen to its
            argmax; the remaining steps train with one module per step (1 = never).
        route_swap: probability that a training batch runs its task's soft route with the
            weights of two random steps exchanged, so that modules must work at more than
            one position (0: never).
        route_random: probability that a training batch runs a random discrete route
            instead of its task's route: one module per step drawn uniformly from the pool,
            repeats allowed, the step norms the task's own (0: never). The pool learns to
            work in any order, as LayerShuffle trains a ViT's layers.
        augment: random shifts of up to 2 pixels on training batches.
        eval_every: evaluate on the test split every this many steps (0: at the end only).
        checkpoint_every: write the run's checkpoint every this many steps (0: at the end only).
        log_every: write a training log line every this many steps.
        seed: seeds model initialisation, batch order and augmentation.
        device: `auto` (CUDA when present), `cpu` or `cuda` (under torchrun: the process's GPU).
        precision: `fp32`, or `bf16` to run forward passes under bfloat16 autocast (GPUs
            with bf16 support; on the CPU it runs, slower than fp32).
        compile: a `torch.compile` backend for the model's forward pass (`inductor` on a
            GPU; `aot_eager` checks the graph without generating code); empty for none. A
            modular network compiles one graph for every task (`isomod.training.compiled`).
        compile_mode: the `torch.compile` mode (`default`, `reduce-overhead`,
            `max-autotune`, `max-autotune-no-cudagraphs`); empty for torch's default.
        group_tasks: run the tasks of a step as one forward pass, their batches side by side
            as channel groups (one grouped convolution and one norm per block half; see
            `isomod.training.grouped`): far fewer operator calls, the same numbers up to
            float rounding. For a modular network of convolution blocks with weight mixing,
            every task's batch of one size, the supervised objective, no exchanged or random
            routes and no compile; anything else is refused in one line.
    """

    steps: int = 2000
    batch_size: int = 64
    tasks_per_step: int = 1
    sampling: str = "uniform"
    batch_order: str = "epochs"
    lr: float = 2e-3
    lr_routes: float = 0.05
    lr_heads: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 50
    routes: str = "annealed"
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    entropy_weight: float = 0.01
    discretize_at: float = 0.75
    route_swap: float = 0.0
    route_random: float = 0.0
    augment: bool = True
    eval_every: int = 0
    checkpoint_every: int = 500
    log_every: int = 20
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: str = ""
    compile_mode: str = ""
    group_tasks: bool = False

    def __post_init__(self):
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("sampling", self.sampling, SAMPLINGS)
        check_choice("batch order", self.batch_order, BATCH_ORDERS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("compile mode", self.compile_mode, COMPILE_MODES)
        check_choice("route schedule", self.routes, ROUTE_SCHEDULES)
        for name in ("steps", "batch_size", "tasks_per_step", "log_every"):
            if getattr(self, name) < 1:
                raise IsomodError(f"train config {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lr_routes", "lr_heads", "weight_decay", "entropy_weight", "warmup_steps",
                     "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise IsomodError(f"train config {name} must be a finite number >= 0, got {value}")
        for name in ("temperature_start", "temperature_end"):
            if not 0 < getattr(self, name) < float("inf"):
                raise IsomodError(f"train config {name} must be > 0, got {getattr(self, name)}")
        for name in ("discretize_at", "route_swap", "route_random"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise IsomodError(f"train config {name} must lie in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return from_dict(cls, data, "train config")

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        frac = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.schedule == "step":
            return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
        return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def route_schedule(config: TrainConfig) -> RouteSchedule:
    """The route schedule `config.routes` names, with its numbers and exchanged steps."""
    if config.routes == "soft":
        return RouteSchedule.soft(swap=config.route_swap, random=config.route_random)
    return RouteSchedule(config.steps, config.temperature_start, config.temperature_end, config.entropy_weight,
                         config.discretize_at, config.route_swap, config.route_random)


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:K`; under torchrun, `auto` and
    `cuda` mean this process's GPU, and `cuda:K` is refused (every process would take GPU K)."""
    if distributed.world_size() > 1 and name.startswith("cuda:"):
        raise IsomodError(f"device {name}: under torchrun each process takes its own GPU (cuda:LOCAL_RANK); use "
                          "--device cuda or auto, and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if name in ("auto", "cuda") and torch.cuda.is_available() and distributed.world_size() > 1:
        return distributed.local_device()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise IsomodError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IsomodError("device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def device_settings(device: torch.device) -> None:
    """What a CUDA run turns on: TF32 matrix products and convolutions (fp32 runs keep their
    accumulations in fp32), and cuDNN's search for the fastest convolution algorithm (whose
    choice can differ between runs: a CUDA run is not bit-for-bit repeatable)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def forward_options(model: TaskModel, device: torch.device, precision: str, compile: str, mode: str = ""
                    ) -> tuple[TaskModel, torch.autocast]:
    """What training forward passes run through: the model, or its `torch.compile`d
    forward (parameters, routes and heads stay the model's; `isomod.training.compiled`),
    and the autocast context `precision` asks for (disabled for `fp32`)."""
    forward = compiled(model, compile, mode) if compile else model
    return forward, torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
