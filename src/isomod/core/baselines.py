"""Baselines with the same interface as ModularNet: a plain isometric ResNet used as a
shared trunk with one head per task, and independent plain networks, one per task."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from isomod.core.network import ModelConfig, TaskModel, TaskSpec, check_input, make_norm, make_pool, make_stem, pooled


class PlainResNet(TaskModel):
    """An isometric network of `config.steps` distinct blocks with shared norms: a ResNet of
    residual convolution blocks, or (`block="transformer"`) a plain ViT.

    The same blocks as ModularNet's pool, run once each in order; every task shares
    stem, blocks and norms and owns only its head (the shared-trunk baseline).

    Args:
        config: the shape; `num_modules`, `mixing` and the route fields are ignored.
        tasks: tasks (heads) to create at once.
    """

    def __init__(self, config: ModelConfig, tasks: list[TaskSpec] = ()):
        super().__init__()
        self.config = config
        self.stem = make_stem(config)
        self.blocks = nn.ModuleList(make_pool(replace(config, norm_affine="step"), config.steps).blocks)
        self.norms = nn.ModuleList(make_norm(config) for _ in range(2 * config.steps + 1))
        self.heads = nn.ModuleDict()
        self.specs: dict[str, TaskSpec] = {}
        for spec in tasks:
            self.add_task(spec)

    def add_task(self, spec: TaskSpec) -> None:
        self.check_spec(spec, self.config)
        self.heads[spec.name] = nn.Linear(self.config.channels, spec.num_classes).to(self.stem.weight.device)
        self.specs[spec.name] = spec

    def forward_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        check_input(x, self.config)
        h = self.stem(x)  # (B, C, H', W'), or tokens (B, T, C)
        for l, block in enumerate(self.blocks):
            h = block(h, self.norms[2 * l], self.norms[2 * l + 1])
        return pooled(self.config, h, self.norms[-1])  # (B, C)

    def forward_head(self, h: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        return self.heads[task](h)

    def remove_task(self, task: str) -> None:
        self.check_task(task)
        del self.heads[task]
        del self.specs[task]

    def norm_layers(self) -> list[nn.Module]:
        return list(self.norms)

    def _param_groups(self, tasks: list[str] | None) -> dict[str, list[nn.Parameter]]:
        """Everything trainable, or with `tasks` only their heads (all a task owns here)."""
        if tasks is not None:
            return {"heads": [p for t in tasks for p in self.heads[self.check_task(t).name].parameters()]}
        return {
            "stem": list(self.stem.parameters()),
            "pool": list(self.blocks.parameters()),
            "norms": list(self.norms.parameters()),
            "heads": list(self.heads.parameters()),
        }

    def task_param_count(self, task: str) -> int:
        self.check_task(task)
        return sum(p.numel() for p in self.heads[task].parameters())


class IndependentNets(TaskModel):
    """One PlainResNet per task, sharing nothing (the independent-networks baseline)."""

    def __init__(self, config: ModelConfig, tasks: list[TaskSpec] = ()):
        super().__init__()
        self.config = config
        self.nets = nn.ModuleDict()
        self.specs: dict[str, TaskSpec] = {}
        for spec in tasks:
            self.add_task(spec)

    def add_task(self, spec: TaskSpec) -> None:
        self.check_spec(spec, self.config)
        device = next(iter(self.nets.values())).stem.weight.device if self.nets else None
        self.nets[spec.name] = PlainResNet(replace(self.config), [spec]).to(device)
        self.specs[spec.name] = spec

    def forward_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        return self.nets[task].forward_features(x, task)

    def forward_head(self, h: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        return self.nets[task].forward_head(h, task)

    def remove_task(self, task: str) -> None:
        self.check_task(task)
        del self.nets[task]
        del self.specs[task]

    def norm_layers(self) -> list[nn.Module]:
        return [m for net in self.nets.values() for m in net.norm_layers()]

    def _param_groups(self, tasks: list[str] | None) -> dict[str, list[nn.Parameter]]:
        """Every network's parameters, or with `tasks` their whole networks."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name in self.task_names if tasks is None else [self.check_task(t).name for t in tasks]:
            for k, v in self.nets[name]._param_groups(None).items():
                groups.setdefault(k, []).extend(v)
        return groups

    def task_param_count(self, task: str) -> int:
        self.check_task(task)
        return self.nets[task].param_count()
