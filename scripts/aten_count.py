"""ATen operator events of one 8-task training step, as `torch.profiler` counts them on the
CPU (nested calls included), split into the optimizer's and the rest (forward, backward).

    python scripts/aten_count.py           # the Trainer's own step (AdamW foreach on the CPU)
    python scripts/aten_count.py --fused   # with the fused AdamW a GPU run uses
    python scripts/aten_count.py --grouped # the step's tasks as one forward pass (group_tasks)

The step: 8 tasks of 32 images, a pool of 16 modules, 8 steps, width 32 (bench speed's
multi-task shape), one thread, after one warm-up step.
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile


def count(fused: bool, grouped: bool = False) -> dict:
    from isomod.bench.speed import SpeedConfig, prepare_training
    from isomod.core.network import ModelConfig, ModularNet
    from isomod.core.spec import TaskSpec
    from isomod.training import trainer

    if fused:  # the kernels a GPU run gets, on the CPU
        trainer.optimizer_kernels = lambda device: {"fused": True}
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = ModularNet(ModelConfig(channels=32, num_modules=16, steps=8, stem_stride=2),
                     [TaskSpec(f"t{i}", 10) for i in range(8)])
    prepared = prepare_training(net, SpeedConfig(batch_size=256, warmup=1), torch.device("cpu"), group_tasks=grouped)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        prepared.step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def in_optimizer(e) -> bool:
        while e is not None:
            if e.name.startswith("Optimizer."):
                return True
            e = e.cpu_parent
        return False

    optimizer = [e for e in events if in_optimizer(e)]
    rest = collections.Counter(e.name for e in events if not in_optimizer(e))
    return {"all": len(events), "optimizer": len(optimizer), "forward_backward": len(events) - len(optimizer),
            "top": rest.most_common(8)}


if __name__ == "__main__":
    found = count("--fused" in sys.argv, "--grouped" in sys.argv)
    print(f"ATen events of an 8-task step: {found['all']:,} (optimizer {found['optimizer']:,}, "
          f"forward and backward {found['forward_backward']:,})")
    print("most frequent outside the optimizer:", ", ".join(f"{n} {c}" for n, c in found["top"]))
