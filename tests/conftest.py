import fcntl
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from isomod.io.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from isomod.data import glyphs
from isomod.data.tasks import TaskData, from_arrays, load_task
from isomod.core.network import ModelConfig, ModularNet
from isomod.training.trainer import TrainConfig, Trainer


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Generated data goes to a private cache, never the user's."""
    # One cache for every xdist worker (generated data is written atomically, and the same).
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["ISOMOD_CACHE"] = str(shared / "isomod-cache")
    # Under pytest-xdist each worker takes one thread: two workers with two threads each on
    # two cores would run many times slower than one.
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def glyph_task(script: str, train: int = 60, test: int = 15):
    return from_arrays(f"glyphs/{script}", glyphs.generate(script, train, test), list(glyphs.SCRIPTS[script]))


@pytest.fixture(scope="session")
def digit_tasks():
    """Two real tasks with in-distribution test sets: MNIST (a subset) and UCI digits."""
    mnist, uci = load_task("mnist"), load_task("uci-digits")
    g = torch.Generator().manual_seed(0)  # the split is ordered by class: draw at random
    tr, te = torch.randperm(len(mnist.y_train), generator=g)[:1500], torch.randperm(len(mnist.y_test), generator=g)[:500]
    small = TaskData(mnist.spec, mnist.x_train[tr], mnist.y_train[tr], mnist.x_test[te], mnist.y_test[te])
    return [small, uci]


@pytest.fixture(scope="session")
def two_tasks():
    return [glyph_task("digits"), glyph_task("hebrew")]


# --- digits5 domains and a two-source model, for the adaptation tests -----------------------
SMALL = ModelConfig(in_channels=3, channels=8, num_modules=3, steps=3, route_init="permutation")
QUICK_ADAPT = TrainConfig(steps=12, batch_size=32, lr=1e-3, lr_routes=5e-2, warmup_steps=2, augment=False,
                          checkpoint_every=0, discretize_at=0.5)


def subset(task: TaskData, n_train: int, n_test: int) -> TaskData:
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(task.y_train), generator=g)[:n_train]
    te = torch.randperm(len(task.y_test), generator=g)[:n_test]
    return TaskData(task.spec, task.x_train[tr], task.y_train[tr], task.x_test[te], task.y_test[te])


@pytest.fixture(scope="session")
def domains():
    return {d: subset(load_task(f"digits5/{d}"), 600, 300) for d in ("mnist", "synth", "uci")}


@contextmanager
def shared(name: str):
    """The path `name` in the cache every xdist worker shares, held under an exclusive lock:
    the first worker to get here makes it, the others wait and read it."""
    path = Path(os.environ["ISOMOD_CACHE"]) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def sources_model(domains):
    """Two sources trained 500 steps, once for both workers: each reads the checkpoint."""
    with shared("sources-model") as path:
        if not checkpoint_exists(path):
            torch.manual_seed(0)
            sources = [domains["mnist"], domains["synth"]]
            model = ModularNet(replace(SMALL, channels=16), [t.spec for t in sources])
            Trainer(model, sources, TrainConfig(steps=500, batch_size=64, lr=5e-3, lr_heads=5e-3, warmup_steps=5,
                                                checkpoint_every=0), progress=False).fit()
            save_checkpoint(model, path)
        return load_checkpoint(path).eval()



def write_npz(path, n_train=40, n_test=20, classes=3, shape=(12, 12), seed=0, **override):
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def image_folder(root, classes=("cat", "dog"), n=5, rgb=False, size=16):
    """A folder of class sub-folders of random PNG images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3) if rgb else (size, size), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root
