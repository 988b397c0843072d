"""`isomod bench mtl`: the modular network against independent networks and a shared
trunk, on one suite, same data, same steps, same batch size, same schedule."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from isomod import report
from isomod.baselines import IndependentNets, PlainResNet
from isomod.data.tasks import TaskData, load_suite
from isomod.network import ModelConfig, ModularNet, TaskModel
from isomod.train import TrainConfig, Trainer

METHODS = {"modular": ModularNet, "independent": IndependentNets, "shared_trunk": PlainResNet}

# The default budget: under 3 minutes per method and seed on 2 CPU cores.
DEFAULT_MODEL = ModelConfig(channels=32, num_modules=16, steps=8)
DEFAULT_TRAIN = TrainConfig(steps=2000, batch_size=128, lr=5e-3, lr_heads=5e-3, checkpoint_every=500, log_every=25)
DEFAULT_SEEDS = [0, 1]


def rows_for(method: str, model: TaskModel, accs: dict[str, float], seed: int) -> list[dict]:
    total = model.param_count()
    rows = [{"method": method, "task": t, "metric": "test_acc", "value": round(a, 5), "params_total": total,
             "params_task": model.task_param_count(t), "seed": seed} for t, a in accs.items()]
    rows.append({"method": method, "task": "mean", "metric": "test_acc", "value": round(float(np.mean(list(accs.values()))), 5),
                 "params_total": total, "params_task": int(np.mean([r["params_task"] for r in rows])), "seed": seed})
    return rows


def run(out_dir: str | Path, suite: str = "glyphs", model_config: ModelConfig = DEFAULT_MODEL,
        train_config: TrainConfig = DEFAULT_TRAIN, seeds: list[int] = (0,), methods: list[str] = tuple(METHODS),
        tasks: list[TaskData] | None = None, progress: bool = True, bench: str = "mtl") -> dict:
    """Train every method for every seed; write `results.json`, figures and `report.md`.

    Args:
        out_dir: output folder; each run keeps its checkpoint and log under `runs/`.
        suite: the task suite (ignored when `tasks` is given).
        model_config: the shape shared by all methods (baselines use `steps` distinct blocks).
        train_config: the budget shared by all methods; its seed is replaced per run.
        seeds: one run per seed and method.
        methods: a subset of `modular`, `independent`, `shared_trunk`.
        tasks: the tasks themselves, instead of a suite name.
        progress: show progress bars.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = tasks if tasks is not None else load_suite(suite)
    specs = [t.spec for t in tasks]
    rows: list[dict] = []
    routes: dict = {}
    timings: dict[str, float] = {}
    for seed in seeds:
        for method in methods:
            torch.manual_seed(seed)
            model = METHODS[method](model_config, specs)
            run_dir = out / "runs" / f"{method}-s{seed}"
            if progress:
                print(f"== {method} (seed {seed}): {model.param_count():,} parameters", flush=True)
            trainer = Trainer(model, tasks, replace(train_config, seed=seed), out_dir=run_dir, progress=progress)
            t0 = time.time()
            accs = trainer.fit()
            timings[f"{method}-s{seed}"] = round(time.time() - t0, 1)
            rows += rows_for(method, model, accs, seed)
            if isinstance(model, ModularNet):
                routes[f"s{seed}"] = {
                    "discrete": {n: model.route(n).indices() for n in model.task_names},
                    "soft_at_discretize": trainer.soft_usage,
                }
    results = {"bench": bench, "config": {"suite": suite, "tasks": [t.name for t in tasks],
                                          "model": asdict(model_config), "train": asdict(train_config),
                                          "seeds": list(seeds), "methods": list(methods)},
               "rows": rows, "routes": routes, "train_seconds": timings}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, results)
    return results


def write_report(out: Path, results: dict) -> Path:
    """Draw the figures and write `report.md` from `results` (as in `results.json`)."""
    rows = results["rows"]
    cfg = results["config"]
    parts = [f"# isomod bench {results['bench']}: {cfg['suite']}", "",
             f"Test accuracy (%) on held-out data, mean over seeds {cfg['seeds']}; every method trained "
             f"{cfg['train']['steps']} steps of {cfg['train']['batch_size']} images with the same schedule.", "",
             report.markdown_results(rows), ""]
    report.plot_task_accuracy(rows, out / "accuracy.png")
    parts += ["![accuracy per task](accuracy.png)", ""]
    logs = {p.parent.name: report.read_log(p) for p in sorted((out / "runs").glob("*/log.jsonl"))}
    if logs:
        report.plot_curves(logs, out / "curves.png")
        parts += ["## Training curves", "", "![training curves](curves.png)", ""]
    first = next(iter(results.get("routes", {}).values()), None)
    if first:
        discrete = first["discrete"]
        onehot = {n: np.eye(cfg["model"]["num_modules"])[r] for n, r in discrete.items()}
        parts += ["## Routes", "", "Discrete routes (module index per step):", "", "```"]
        parts += [f"{n}: {' '.join(map(str, r))}" for n, r in discrete.items()] + ["```", ""]
        if first.get("soft_at_discretize"):
            report.plot_usage(first["soft_at_discretize"], out / "usage.png", chosen=discrete)
            parts += ["Module-usage maps: soft route weights just before discretisation, the chosen "
                      "module marked by a dot.", "", "![module usage](usage.png)", ""]
        soft = first.get("soft_at_discretize")
        report.plot_similarity(soft or onehot, out / "similarity.png")
        what = ("soft routes just before discretisation" if soft else "discrete routes")
        parts += [f"Task similarity from the {what}: the probability that two tasks run the same module "
                  "at a step, averaged over steps.", "", "![task similarity](similarity.png)", ""]
    parts += report.markdown_times(results.get("train_seconds", {}))
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
