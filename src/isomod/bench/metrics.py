"""What several benches measure besides accuracy: multiply-adds per image, and the training
loss over the last fifths of a run (read from its log)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

@torch.no_grad()
def macs_per_image(model, task: str) -> int:
    """Multiply-adds of one forward pass of one image of `task` as the model runs it now
    (convolutions and linear layers, counted by `torch.utils.flop_counter`; a soft route
    under weight mixing also counts the mixing of the modules' weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = model.check_task(task)
    param = next(model.parameters())
    with model.evaluating(), FlopCounterMode(display=False) as counter:
        model(torch.zeros((1, *spec.input_shape), device=param.device, dtype=param.dtype), task)
    return counter.get_total_flops() // 2


def read_log(path: Path) -> list[dict]:
    """The records of a run's `log.jsonl` (none when the file is missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_fifths(records: list[dict]) -> tuple[float, float] | None:
    """Mean logged training loss over the fourth and over the last fifth of a run's steps:
    a converged run has the two about equal."""
    rec = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not rec:
        return None
    end = rec[-1][0]
    fourth = [loss for step, loss in rec if 0.6 * end < step <= 0.8 * end]
    last = [loss for step, loss in rec if step > 0.8 * end]
    if not fourth or not last:
        return None
    return sum(fourth) / len(fourth), sum(last) / len(last)
