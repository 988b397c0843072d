"""`isomod bench transfer`: a pool pre-trained on some tasks, reused for held-out tasks by
route-only transfer and by the usual baselines, with the same data and budget for all.

Route-only, head-only and norms+head train a few thousand numbers and use the transfer
budget's learning rate; fine-tuning and scratch train whole networks and use the
pre-training learning rate instead (fine-tuning on held-out Georgian scored 93.6% at 5e-3,
90.7% at 2e-3). Same steps and batches for all.

Pre-training runs once per seed (kept in `OUT/pretrain-s{seed}/checkpoint`, reused when
the command runs again); every transfer run then starts from a fresh copy of that model.
Rows are written to `results.json` as they come, and a second run of the same command
(same configuration) skips the rows it already has, so a stopped benchmark resumes.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from isomod import report
from isomod.transfer import TRANSFER_METHODS, TRANSFER_TRAIN, few_shot, select_source, transfer
from isomod.bench import train_modular, write_results
from isomod.data.tasks import load_task
from isomod.network import ModelConfig
from isomod.train import TrainConfig

PRETRAIN = ["glyphs/latin_upper", "glyphs/latin_lower", "glyphs/digits", "glyphs/greek", "glyphs/cyrillic",
            "glyphs/armenian"]
HELD_OUT = ["glyphs/georgian", "glyphs/hebrew", "mnist", "uci-digits", "fashion-mnist"]
SHOTS: list[int | None] = [10, 100, None]
DEFAULT_MODEL = ModelConfig(channels=32, num_modules=16, steps=8)
DEFAULT_PRETRAIN = TrainConfig(steps=2000, batch_size=128, lr=5e-3, lr_heads=5e-3, checkpoint_every=500, log_every=25)
DEFAULT_TRANSFER = replace(TRANSFER_TRAIN, steps=400)


def shots_label(shots: int | None) -> int | str:
    return "all" if shots is None else shots


def run(out_dir: str | Path, pretrain_tasks: list[str] = tuple(PRETRAIN), held_out: list[str] = tuple(HELD_OUT),
        shots: list[int | None] = tuple(SHOTS), methods: list[str] = TRANSFER_METHODS,
        model_config: ModelConfig = DEFAULT_MODEL, pretrain_config: TrainConfig = DEFAULT_PRETRAIN,
        transfer_config: TrainConfig = DEFAULT_TRANSFER, seeds: list[int] = (0,), data_dir: str | None = None,
        progress: bool = True) -> dict:
    """Pre-train, transfer every held-out task with every method and shot count; write
    `results.json`, figures and `report.md`.

    Args:
        out_dir: output folder.
        pretrain_tasks: the tasks the pool is trained on.
        held_out: tasks never seen in pre-training, each learned afresh by every method.
        shots: training images per class; None means all of them.
        methods: a subset of `TRANSFER_METHODS`.
        model_config: the pre-trained model's shape (scratch uses the same).
        pretrain_config: the multi-task pre-training budget.
        transfer_config: the budget of every transfer run, whatever the method.
        seeds: one pre-training and one set of transfer runs per seed.
        data_dir: where to look for data that is not embedded (Fashion-MNIST).
        progress: show progress bars.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"pretrain_tasks": list(pretrain_tasks), "held_out": list(held_out),
              "shots": [shots_label(s) for s in shots], "methods": list(methods), "seeds": list(seeds),
              "model": asdict(model_config), "pretrain": asdict(pretrain_config), "transfer": asdict(transfer_config)}
    path = out / "results.json"
    results = {"bench": "transfer", "config": config, "rows": [], "pretrain": {}, "routes": {}, "sources": {},
               "train_seconds": {}}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("config") == config:
            results = old
    done = {(r["method"], r["task"], r["shots"], r["seed"]) for r in results["rows"]}
    pre_data = [load_task(t, data_dir=data_dir) for t in pretrain_tasks]
    new_data = {t: load_task(t, data_dir=data_dir) for t in held_out}
    for seed in seeds:
        if progress:
            print(f"== pre-training on {len(pre_data)} tasks (seed {seed})", flush=True)
        base, pre_accs = train_modular(out / f"pretrain-s{seed}", pre_data, model_config, pretrain_config, seed,
                                       progress)
        base.eval()
        results["pretrain"][f"s{seed}"] = {"test_acc": pre_accs, "params": base.param_count(),
                                           "routes": {n: base.route(n).indices() for n in base.task_names}}
        cfg = replace(transfer_config, seed=seed)
        whole = replace(cfg, lr=pretrain_config.lr, lr_heads=pretrain_config.lr)
        for data in new_data.values():
            name = data.name
            source, scores = select_source(base, data, seed=seed)
            results["sources"][f"{name}-s{seed}"] = {"source": source, "scores": scores}
            for k in shots:
                task = few_shot(data, k, seed=seed)
                for method in methods:
                    key = (method, name, shots_label(k), seed)
                    if key in done:
                        continue
                    if progress:
                        print(f"== {method} -> {name}, shots {shots_label(k)}, seed {seed} (source {source})", flush=True)
                    t0 = time.time()
                    run_cfg = whole if method in ("finetune", "scratch") else cfg
                    res = transfer(copy.deepcopy(base), task, method, run_cfg, source=source, progress=progress)
                    results["train_seconds"]["/".join(map(str, key))] = round(time.time() - t0, 1)
                    results["rows"].append({
                        "method": method, "task": name, "metric": "test_acc", "value": round(res.test_acc, 5),
                        "shots": shots_label(k), "params_total": base.param_count() + res.params_task,
                        "params_task": res.params_task, "seed": seed, "source": source})
                    if method == "route_only":
                        results["routes"][f"{name}/{shots_label(k)}-s{seed}"] = {
                            "discrete": res.model.route(name).indices(), "soft_at_discretize": res.soft_route}
                    write_results(path, results)
    write_results(path, results)
    write_report(out, results)
    return results


def summary(rows: list[dict]) -> dict:
    """Mean test accuracy over seeds by (method, task, shots), and mean added parameters."""
    acc: dict = {}
    params: dict = {}
    for r in rows:
        acc.setdefault((r["method"], r["task"], r["shots"]), []).append(r["value"])
        params.setdefault((r["method"], r["task"]), []).append(r["params_task"])
    return {"acc": {k: float(np.mean(v)) for k, v in acc.items()},
            "params": {k: int(np.mean(v)) for k, v in params.items()}}


def markdown_table(results: dict) -> str:
    """One row per held-out task and shot count, one column per method; then added parameters."""
    cfg = results["config"]
    s = summary(results["rows"])
    methods = [m for m in cfg["methods"] if any(k[0] == m for k in s["acc"])]
    lines = ["| task | shots | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    tasks = list(dict.fromkeys(r["task"] for r in results["rows"]))
    for task in tasks:
        for shots in cfg["shots"]:
            vals = [s["acc"].get((m, task, shots)) for m in methods]
            if all(v is None for v in vals):
                continue
            best = max(v for v in vals if v is not None)
            cells = ["" if v is None else (f"**{100 * v:.1f}**" if v == best else f"{100 * v:.1f}") for v in vals]
            lines.append(f"| {task} | {shots} | " + " | ".join(cells) + " |")
    for shots in cfg["shots"]:
        means = []
        for m in methods:
            vals = [s["acc"][(m, t, shots)] for t in tasks if (m, t, shots) in s["acc"]]
            means.append(f"{100 * np.mean(vals):.1f}" if vals else "")
        if any(means):
            lines.append(f"| **mean** | {shots} | " + " | ".join(means) + " |")
    pre = next(iter(results.get("pretrain", {}).values()), {}).get("params")
    for task in tasks:
        cells = []
        for m in methods:
            p = s["params"].get((m, task))
            cells.append("" if p is None else f"{p:,}" + (f" ({100 * p / pre:.2f}%)" if pre else ""))
        lines.append(f"| params added: {task} | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict, tasks: list[str]) -> list[str]:
    """The issue's targets on `tasks` with all data: route-only >= 95% of fine-tuning,
    >= head-only + 5 points, < 2% added parameters."""
    s = summary(results["rows"])
    pre = next(iter(results.get("pretrain", {}).values()), {}).get("params")
    out = []
    for t in tasks:
        r, f, h = (s["acc"].get((m, t, "all")) for m in ("route_only", "finetune", "head_only"))
        if r is None or f is None or h is None:
            continue
        p = s["params"][("route_only", t)]
        out.append(f"- {t}: route-only {100 * r:.1f} = {100 * r / f:.1f}% of fine-tuning ({100 * f:.1f}; target 95%), "
                   f"{100 * (r - h):+.1f} points over head-only ({100 * h:.1f}; target +5), "
                   f"{p:,} added parameters = {100 * p / pre:.2f}% of {pre:,} (target < 2%)")
    return out


def write_report(out: Path, results: dict) -> Path:
    """Draw the figures and write `report.md` from `results`."""
    cfg = results["config"]
    rows = results["rows"]
    glyph_tasks = list(dict.fromkeys(r["task"] for r in rows if r["task"].startswith("glyphs/")))
    parts = ["# isomod bench transfer", "",
             f"A {cfg['model']['num_modules']}-module pool pre-trained on {', '.join(cfg['pretrain_tasks'])} "
             f"({cfg['pretrain']['steps']} steps), then each held-out task learned by every method with the same "
             f"budget: {cfg['transfer']['steps']} steps of up to {cfg['transfer']['batch_size']} images (learning rate "
             f"{cfg['transfer']['lr']:g}; {cfg['pretrain']['lr']:g}, the pre-training rate, for finetune and scratch, "
             "which train whole networks). "
             f"Test accuracy (%), mean over seeds {cfg['seeds']}; shots = training images per class.", "",
             markdown_table(results), ""]
    checks = targets(results, glyph_tasks)
    if checks:
        parts += ["Targets on the held-out glyph scripts, all data:", "", *checks, ""]
    if rows:
        report.plot_transfer(rows, out / "accuracy_vs_params.png")
        parts += ["![accuracy against added parameters](accuracy_vs_params.png)", ""]
    first_seed = next(iter(results.get("pretrain", {})), None)
    if first_seed and results.get("routes"):
        pre_routes = results["pretrain"][first_seed]["routes"]
        n = cfg["model"]["num_modules"]
        panels, chosen = {}, {}
        for key, route in results["routes"].items():
            if not key.endswith(f"/all-{first_seed}"):
                continue
            task = key.rsplit("/", 1)[0]
            new = np.asarray(route["soft_at_discretize"] or np.eye(n)[route["discrete"]])
            names, sim = report.route_similarity({"new": new, **{p: np.eye(n)[r] for p, r in pre_routes.items()}})
            sims = dict(zip(names[1:], sim[0, 1:].tolist()))
            panels[f"new: {task}"] = new
            chosen[f"new: {task}"] = route["discrete"]
            for p in sorted(sims, key=sims.get, reverse=True)[:2]:
                label = f"{task.rsplit('/', 1)[-1]} ~ {p.rsplit('/', 1)[-1]} ({sims[p]:.2f})"
                panels[label] = np.eye(n)[pre_routes[p]]
                chosen[label] = pre_routes[p]
        if panels:
            report.plot_usage(panels, out / "routes.png", chosen=chosen, cols=3,
                              title="new task's route (soft, before discretising) next to the two most similar "
                                    "pre-training routes")
            parts += ["## Routes", "",
                      "Each held-out task's learned route (all data, first seed) next to the two pre-training "
                      "routes it resembles most (similarity: the new route's weight on the pre-training route's "
                      "module, averaged over steps).", "", "![routes](routes.png)", ""]
    sources = results.get("sources", {})
    if sources:
        parts += ["## Source task", "",
                  "The pre-training task whose frozen features separate the new classes best (nearest-class-mean "
                  "accuracy); every method but scratch starts from its norms, head-only, norms+head and fine-tuning "
                  "keep its route, and route-only starts its own route biased towards it.", "", "| held-out task | source | score |", "|---|---|---:|"]
        parts += [f"| {k} | {v['source']} | {v['scores'][v['source']]:.3f} |" for k, v in sources.items()] + [""]
    pre = results.get("pretrain", {})
    if pre:
        parts += ["## Pre-training", "", "| seed | mean test acc | parameters |", "|---|---:|---:|"]
        parts += [f"| {s} | {100 * np.mean(list(v['test_acc'].values())):.1f} | {v['params']:,} |" for s, v in pre.items()]
        parts.append("")
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
