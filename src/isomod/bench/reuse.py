"""`isomod bench reuse`: block reuse for one task, at equal parameters.

A single-task ModularNet whose `L` steps run a pool of `N` modules. The methods differ
only in the route, so any difference in accuracy comes from the order modules run in:

    once          L = N, modules 0 1 2 3 run once each (the base network)
    cyclic        0 1 2 3 0 1 2 3 (L = 2N)
    block_repeat  0 0 1 1 2 2 3 3
    learned       a soft route over the N modules, annealed, then discretised
    distinct      L modules 0 .. L-1 run once each: the upper reference, L/N times the parameters

Parameters and multiply-adds per image are counted from the trained model; every run
shares data, steps, batch size and schedule. With `torchrun --nproc_per_node=P` the same
command trains data-parallel (see `isomod.distributed`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from isomod import distributed, report
from isomod.bench import train_modular, write_results
from isomod.data.tasks import TaskData, load_task
from isomod.errors import IsomodError, check_choice
from isomod.network import ModelConfig, macs_per_image
from isomod.train import TrainConfig

REUSE_METHODS = ("once", "cyclic", "block_repeat", "learned", "distinct")
MODULES = (4, 8)
MULTIPLES = (1, 2, 3)
SEEDS = (0, 1)
DEFAULT_MODEL = ModelConfig(channels=16)
DEFAULT_TRAIN = TrainConfig(steps=1500, batch_size=64, lr=5e-3, lr_heads=5e-3, augment=False, checkpoint_every=500,
                            log_every=25)


def reuse_pattern(method: str, num_modules: int, steps: int) -> list[int] | None:
    """The fixed route of `method` over `steps` steps (None for `learned`, which learns one).

    `block_repeat` runs each module for about `steps / num_modules` consecutive steps.
    """
    check_choice("reuse method", method, REUSE_METHODS)
    if method in ("once", "distinct"):
        return list(range(steps))
    if method == "cyclic":
        return [l % num_modules for l in range(steps)]
    if method == "block_repeat":
        return [l * num_modules // steps for l in range(steps)]
    return None


def pool_size(method: str, num_modules: int, steps: int) -> int:
    """How many modules the method's pool holds: `L` for `distinct`, `N` otherwise."""
    return steps if method == "distinct" else num_modules


def plan(modules: list[int], multiples: list[int], methods: list[str]) -> list[tuple[str, int, int]]:
    """The runs `(method, N, L)`: `once` at `L = N`, every other method at each `L > N`."""
    for m in multiples:
        if m < 1:
            raise IsomodError(f"step multiples must be >= 1, got {m}")
    if any(n < 1 for n in modules):
        raise IsomodError(f"pool sizes must be >= 1, got {list(modules)}")
    runs = []
    for n in modules:
        for k in sorted(set(multiples)):
            for method in methods:
                if (method == "once") == (k == 1):
                    runs.append((method, n, k * n))
    if not runs:
        raise IsomodError("nothing to run: `once` needs multiple 1, the other methods a multiple above 1")
    return runs


def run(out_dir: str | Path, task: str = "fashion-mnist", data_dir: str | None = None, image_size: int | None = None,
        modules: list[int] = MODULES, multiples: list[int] = MULTIPLES, methods: list[str] = REUSE_METHODS,
        model_config: ModelConfig = DEFAULT_MODEL, train_config: TrainConfig = DEFAULT_TRAIN,
        seeds: list[int] = SEEDS, progress: bool = True, data: TaskData | None = None) -> dict:
    """Train every planned `(method, N, L)` for every seed; write `results.json`, figures, `report.md`.

    Args:
        out_dir: output folder; each run keeps its checkpoint and log under `runs/`, and a
            run whose checkpoint is complete is reloaded, not trained again.
        task: a registered task (`fashion-mnist`, `glyphs/all`, ...), a folder of class
            sub-folders of images, or an `.npz`.
        data_dir: where Fashion-MNIST is looked for first.
        image_size: side images of a folder are resized to (default 28).
        modules: pool sizes `N`.
        multiples: route lengths as multiples of `N` (1 runs `once`, above 1 the others).
        methods: a subset of `REUSE_METHODS`.
        model_config: width and block shape; `num_modules`, `steps` and `in_channels` are
            set per run.
        train_config: the budget every run shares; its seed is replaced per run.
        seeds: one run per seed.
        progress: show progress bars (rank 0 only).
        data: the task's data itself, instead of loading `task`.
    """
    distributed.setup()
    out = Path(out_dir)
    data = data if data is not None else load_task(task, data_dir=data_dir, image_size=image_size)
    runs = plan(list(modules), list(multiples), list(methods))
    base = replace(model_config, in_channels=data.spec.input_shape[0])
    say = print if progress and distributed.is_main() else (lambda *a, **k: None)
    say(f"bench reuse: {data.name}, {data.spec.num_classes} classes, {len(data.y_train):,} train / "
        f"{len(data.y_test):,} test images of {data.spec.input_shape}; {len(runs)} runs x {len(seeds)} seed(s)")
    rows: list[dict] = []
    routes: dict[str, list[int]] = {}
    timings: dict[str, float] = {}
    for seed in seeds:
        for method, n, steps in runs:
            name = f"{method}-N{n}-L{steps}-s{seed}"
            config = replace(base, num_modules=pool_size(method, n, steps), steps=steps)
            pattern = reuse_pattern(method, n, steps)
            say(f"== {name}: route {' '.join(map(str, pattern)) if pattern else 'learned'}", flush=True)
            t0 = time.time()
            model, accs = train_modular(out / "runs" / name, [data], config, train_config, seed, progress,
                                        routes={data.name: pattern} if pattern else None)
            timings[name] = round(time.time() - t0, 1)
            routes[name] = model.route(data.name).indices()
            common = {"method": method, "task": data.name, "N": n, "L": steps, "params_total": model.param_count(),
                      "params_task": model.task_param_count(data.name), "seed": seed}
            rows.append({**common, "metric": "test_acc", "value": round(accs[data.name], 5)})
            rows.append({**common, "metric": "macs", "value": macs_per_image(model, data.name)})
            say(f"   test acc {100 * accs[data.name]:.2f}%, route {' '.join(map(str, routes[name]))}, "
                f"{timings[name]} s")
    results = {"bench": "reuse",
               "config": {"task": data.name, "num_classes": data.spec.num_classes,
                          "input_shape": list(data.spec.input_shape), "modules": list(modules),
                          "multiples": list(multiples), "methods": list(methods), "model": asdict(base),
                          "train": asdict(train_config), "seeds": list(seeds),
                          "world_size": distributed.world_size()},
               "rows": rows, "routes": routes, "train_seconds": timings}
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_results(out / "results.json", results)
        write_report(out, results)
    return results


def summary(rows: list[dict]) -> list[dict]:
    """One entry per `(N, L, method)`: mean and spread (max - min) of test accuracy over
    seeds, parameters and multiply-adds, in the order the runs were made."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["N"], r["L"], r["method"])
        g = groups.setdefault(key, {"N": r["N"], "L": r["L"], "method": r["method"], "acc": [],
                                    "params": r["params_total"], "macs": 0})
        if r["metric"] == "test_acc":
            g["acc"].append(r["value"])
        elif r["metric"] == "macs":
            g["macs"] = r["value"]
    out = []
    for g in groups.values():
        acc = np.array(g.pop("acc"))
        out.append({**g, "mean": float(acc.mean()), "spread": float(acc.max() - acc.min()), "seeds": len(acc)})
    return out


def markdown_table(results: dict) -> str:
    lines = ["| N | L | method | test acc (%) | spread | params | MMACs / image |", "|---:|---:|---|---:|---:|---:|---:|"]
    for s in sorted(summary(results["rows"]), key=lambda s: (s["N"], s["L"], REUSE_METHODS.index(s["method"]))):
        lines.append(f"| {s['N']} | {s['L']} | {s['method']} | {100 * s['mean']:.2f} | {100 * s['spread']:.2f} | "
                     f"{s['params']:,} | {s['macs'] / 1e6:.2f} |")
    return "\n".join(lines)


def checks(results: dict) -> list[str]:
    """For each pool size and reuse method at `L = 2N`: its gain over `once` (a margin must
    exceed both seed spreads) and the share of `distinct`'s gain it recovers (target: half)."""
    table = {(s["N"], s["L"], s["method"]): s for s in summary(results["rows"])}
    lines = []
    for (n, steps, method), s in table.items():
        base, ref = table.get((n, n, "once")), table.get((n, steps, "distinct"))
        if steps != 2 * n or method in ("once", "distinct") or base is None:
            continue
        gain = s["mean"] - base["mean"]
        spread = max(s["spread"], base["spread"])
        text = (f"N={n}, L={steps}, {method}: {100 * s['mean']:.2f} vs once {100 * base['mean']:.2f} "
                f"({100 * gain:+.2f}, seed spread {100 * spread:.2f}: "
                f"{'beats once' if gain > spread else 'not above the spread'})")
        if ref is not None:
            ref_gain = ref["mean"] - base["mean"]
            if ref_gain > 0:
                share = gain / ref_gain
                text += (f"; distinct gains {100 * ref_gain:+.2f}, reuse recovers {100 * share:.0f}% "
                         f"({'met' if share >= 0.5 and gain > spread else 'missed'})")
            else:
                text += f"; distinct gains {100 * ref_gain:+.2f}: no gain to recover"
        lines.append(text)
    return lines


def write_report(out: Path, results: dict) -> Path:
    """Draw the figure and write `report.md` from `results` (as in `results.json`)."""
    cfg = results["config"]
    summ = summary(results["rows"])
    report.plot_reuse(summ, out / "reuse.png", title=f"block reuse on {cfg['task']}")
    parts = [f"# isomod bench reuse: {cfg['task']}", "",
             f"One task, {cfg['num_classes']} classes; a pool of N modules of width {cfg['model']['channels']} "
             f"run over L steps. Test accuracy (%), mean over seeds {cfg['seeds']} (spread: max - min); every run "
             f"trained {cfg['train']['steps']} steps of {cfg['train']['batch_size']} images with the same schedule.",
             "", markdown_table(results), "", "## Checks at L = 2N", ""]
    parts += [f"- {line}" for line in checks(results)] + [""]
    parts += ["![accuracy against parameters and compute](reuse.png)", "", "## Routes (module per step)", "", "```"]
    parts += [f"{name}: {' '.join(map(str, r))}" for name, r in results.get("routes", {}).items()] + ["```", ""]
    parts += report.markdown_times(results.get("train_seconds", {}))
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
