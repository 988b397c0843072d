"""Small fixed runs whose final weights are pinned bit for bit (`tests/data/pinned.json`).

A refactor of the training side must leave what every recipe computes exactly as it was:
`test_pinned.py` runs these and compares SHA-256 digests of the resulting state with the
ones recorded before the change. Floating-point results depend on the machine's kernels,
so the record carries a fingerprint of this platform's arithmetic; where it differs, the
digests cannot be compared and the test says so.

    python tests/pinned.py            # print the digests of this checkout
    python tests/pinned.py --record COMMIT   # record them for this platform in tests/data/pinned.json

The record holds one entry per platform (its fingerprint): recording on a new kind of
machine adds one, from a commit whose results are known to equal the recorded ones on a
platform recorded before (run the old commit and the new one there and compare).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

RECORD = Path(__file__).parent / "data" / "pinned.json"


@contextmanager
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def digest_state(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict, leaving out what a discrete route never reads: its logits
    and temperature (a discrete route runs its `choice`)."""
    unread = {k[: -len("choice")] + name for k, v in state.items() if k.endswith("route.choice") and bool((v >= 0).all())
              for name in ("logits", "temperature")}
    state = {k: v for k, v in state.items() if k not in unread}
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def fingerprint() -> str:
    """A digest of conv, matmul and norm results (forward and backward) on fixed inputs, on
    one thread as the runs are: equal on platforms whose kernels round alike."""
    with one_thread():
        return _fingerprint()


def _fingerprint() -> str:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 7, 7, generator=g)
    w = torch.randn(8, 8, 3, 3, generator=g).requires_grad_(True)
    y = torch.nn.functional.batch_norm(torch.nn.functional.conv2d(x, w, padding=1), None, None, training=True)
    (y.relu() * x).sum().backward()
    z = torch.randn(33, 17, generator=g) @ torch.randn(17, 9, generator=g)
    return digest_state({"conv": y, "grad": w.grad, "mm": z,
                         "torch": torch.tensor([ord(c) for c in torch.__version__])})


def patterns(name: str, classes: int, n: int, seed: int, shape=(1, 12, 12), label_space: str = "", shift: float = 0.0):
    """A task of class-dependent blobs plus noise, made from numpy's seeded generator alone."""
    from isomod.data.tasks import from_arrays

    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(1000 + classes).random((classes, *shape))
    def draw(count):
        y = np.arange(count) % classes
        x = 0.6 * protos[y] + 0.4 * rng.random((count, *shape))
        x = np.clip(x * (1 - shift) + shift * rng.random((count, *shape)), 0, 1)
        return (255 * x).astype(np.uint8), y
    (xtr, ytr), (xte, yte) = draw(n), draw(n // 2)
    task = from_arrays(name, {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}, num_classes=classes)
    task.spec.label_space = label_space
    return task


def runs() -> dict[str, str]:
    from isomod.methods.adapt import adapt, route_oracle
    from isomod.methods.continual import GrowConfig, learn_task
    from isomod.core.network import ModelConfig, ModularNet
    from isomod.training.regimes import regime
    from isomod.training.trainer import TrainConfig, Trainer
    from isomod.methods.transfer import transfer

    out = {}
    shape = ModelConfig(channels=8, num_modules=4, steps=4, stem_stride=3)
    budget = TrainConfig(steps=24, batch_size=16, warmup_steps=3, discretize_at=0.5, checkpoint_every=0,
                         log_every=8, lr=5e-3, lr_heads=5e-3)
    tasks = [patterns("a", 3, 48, 1), patterns("b", 4, 48, 2)]
    new = patterns("c", 3, 48, 3)
    with one_thread():
        torch.manual_seed(0)
        base = ModularNet(shape, [t.spec for t in tasks])
        Trainer(base, tasks, budget, progress=False).fit()
        out["mtl_annealed"] = digest_state(base.state_dict())
        model_cfg, train_cfg = regime("templates_swap").apply(shape, budget)
        torch.manual_seed(0)
        soft = ModularNet(model_cfg, [t.spec for t in tasks])
        Trainer(soft, tasks, train_cfg, progress=False).fit()
        out["mtl_templates_swap"] = digest_state(soft.state_dict())
        quick = TrainConfig(steps=12, batch_size=16, warmup_steps=2, checkpoint_every=0, log_every=4, lr=5e-2,
                            lr_heads=5e-2, routes="soft")
        for pool_name, pool in (("annealed", base), ("templates_swap", soft)):
            for method in ("route_only", "route_head", "head_only", "norm_head", "finetune", "scratch"):
                res = transfer(copy.deepcopy(pool), new, method, quick, source="a", progress=False)
                out[f"transfer_{pool_name}_{method}"] = digest_state(res.model.state_dict())
        stream = [patterns("s1", 3, 48, 4), patterns("s2", 3, 48, 5), patterns("s3", 4, 48, 6)]
        torch.manual_seed(0)
        grower = ModularNet(ModelConfig(channels=8, num_modules=2, steps=3, stem_stride=3))
        for t in stream:
            learn_task(grower, t, replace_steps(budget, 12), GrowConfig(threshold=1.0, modules=1), progress=False)
        out["continual"] = digest_state(grower.state_dict())
        domains = [patterns(f"d{i}", 3, 96, 10 + i, label_space="d", shift=0.2 * i) for i in range(3)]
        target = patterns("dt", 3, 96, 20, label_space="d", shift=0.5)
        torch.manual_seed(0)
        sources = ModularNet(ModelConfig(channels=8, num_modules=3, steps=3, stem_stride=3, route_init="permutation"),
                             [d.spec for d in domains])
        Trainer(sources, domains, budget, progress=False).fit()
        sources.eval()
        out["adapt_sources"] = digest_state(sources.state_dict())
        adapt_budget = TrainConfig(steps=10, batch_size=32, lr=1e-3, lr_routes=5e-2, lr_heads=0.0, weight_decay=0.0,
                                   warmup_steps=2, augment=False, checkpoint_every=0, log_every=5, discretize_at=0.5)
        for method in ("source_only", "adabn", "tent", "route_select", "route_entropy", "route_im", "route_moment",
                       "route_adversarial", "m3sda", "dann"):
            model = copy.deepcopy(sources)
            adapt(model, target, method, adapt_budget, progress=False, source_data={d.name: d for d in domains})
            out[f"adapt_{method}"] = digest_state(model.state_dict())
        oracle = route_oracle(sources, target, [d.name for d in domains], "d1", adapt_budget)[0]
        out["adapt_route_oracle"] = digest_state(oracle.state_dict())
    return out


def replace_steps(config, steps):
    from dataclasses import replace

    return replace(config, steps=steps)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    digests = runs()
    here = {"fingerprint": fingerprint(), "digests": digests}
    if "--record" in argv:
        record = json.loads(RECORD.read_text()) if RECORD.is_file() else {"platforms": {}}
        commit = argv[argv.index("--record") + 1] if len(argv) > argv.index("--record") + 1 else "unnamed"
        record["platforms"][here["fingerprint"]] = {"recorded": commit, "digests": digests}
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {RECORD}")
    print(json.dumps(here, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
