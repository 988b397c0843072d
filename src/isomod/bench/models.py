"""The models several benches train or reload the same way."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from isomod.core.network import ModelConfig, ModularNet
from isomod.data.tasks import TaskData
from isomod.training.trainer import TrainConfig, Trainer
from isomod import seeds


def train_modular(run_dir: Path, tasks: list[TaskData], model_config: ModelConfig, train_config: TrainConfig,
                  seed: int, progress: bool, routes: dict[str, list[int]] | None = None
                  ) -> tuple[ModularNet, dict[str, float]]:
    """Train a ModularNet on `tasks` with `seed` in `run_dir`, or, when its checkpoint
    there is complete, reload it; returns the model and its test accuracy per task.
    `routes` fixes some tasks' routes (module per step) before training."""
    seeds.seed(seed)
    model = ModularNet(model_config, [t.spec for t in tasks])
    for name, pattern in (routes or {}).items():
        model.route(name).set_choice(pattern)
    trainer = Trainer(model, tasks, replace(train_config, seed=seed), out_dir=run_dir, progress=progress)
    return model, trainer.fit(resume="auto")
