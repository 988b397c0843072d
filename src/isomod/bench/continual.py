"""`isomod bench continual`: a stream of tasks learned one by one by a growing modular
network, by independent networks, and by sequential fine-tuning of one plain network.

After every task, every task seen so far is evaluated on its test split, so the rows show
both the final accuracy and what each method forgot on the way. For the modular network
the logits of each task on a fixed batch of its test images are recorded right after it is
learned and compared bit for bit after the last task.

One pass over the stream per method and seed; each pass's rows are saved as it ends, and
the same command run again skips the passes `results.json` holds, so a stopped benchmark
resumes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from isomod.bench import report
from isomod.core.baselines import IndependentNets, PlainResNet
from isomod.bench.base import Bench, Context, Job, check_seeds, register
from isomod.bench.docs import md_table
from isomod.bench.results import Row
from isomod.bench.workers import check_jobs
from isomod.io.checkpoint import save_checkpoint
from isomod.methods.continual import GrowConfig, learn_task
from isomod.data.tasks import TaskData, load_task
from isomod.core.network import ModelConfig, ModularNet, TaskModel
from isomod.errors import check_choices
from isomod.training.regimes import DEFAULT_REGIME, REGIMES, regime
from isomod.core.network import to_float
from isomod.training.trainer import TrainConfig, Trainer, evaluate
from isomod.files import write_text_atomic
from isomod import seeds

METHODS = ("modular_grow", "independent", "finetune_seq")
STREAM = ["glyphs/latin_upper", "glyphs/digits", "glyphs/greek", "mnist", "glyphs/cyrillic", "glyphs/armenian",
          "uci-digits", "glyphs/georgian", "glyphs/hebrew", "glyphs/latin_lower"]
PROBE = 64  # test images per task whose logits must stay bit-identical


@dataclass
class ContinualConfig:
    """`isomod bench continual`: a stream of tasks, every method, one budget per task.

    Args:
        stream: task names, in arrival order.
        methods: a subset of modular_grow, independent, finetune_seq.
        seeds: one pass over the stream per seed and method.
        regime: the modular network's route regime (`isomod.training.regimes`), with a starting
            pool of `model.num_modules` modules.
        jobs: passes over the stream side by side, each in its own process with an
            equal share of the threads.
        data_dir: where data that is not embedded (Fashion-MNIST) is looked for first.
        model: the shape; `num_modules` is the modular network's starting pool. 4x4-pixel
            patches (`stem_stride` 4), as in `bench transfer`: a quarter of a stride-2
            stem's compute per step.
        train: the budget of one training run, the same for every method and task; its
            seed is replaced per pass.
        grow: the modular network's growth threshold and size.
    """

    stream: list[str] = field(default_factory=lambda: list(STREAM))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    regime: str = DEFAULT_REGIME
    jobs: int = 1
    data_dir: str = ""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(channels=32, num_modules=4, steps=8, stem_stride=4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=500, batch_size=128, lr=5e-3, lr_heads=5e-3, warmup_steps=20, checkpoint_every=0, log_every=25))
    grow: GrowConfig = field(default_factory=lambda: GrowConfig(threshold=0.9, modules=2))

    def __post_init__(self):
        check_choices("continual method", self.methods, METHODS)
        check_seeds(self.seeds)
        regime(self.regime)
        check_jobs(self.jobs)


@torch.no_grad()
def probe_logits(model: TaskModel, task: TaskData) -> torch.Tensor:
    device = next(model.parameters()).device
    with model.evaluating():
        return model(to_float(task.x_test[:PROBE].to(device)), task.name).cpu()


def run_method(method: str, stream: list[TaskData], model_config: ModelConfig, train_config: TrainConfig,
               grow: GrowConfig, out: Path, progress: bool) -> tuple[list[Row], dict]:
    """Learn the stream with one method (seeded by `train_config.seed`); rows after every
    task, plus what the method did."""
    seeds.seed(train_config.seed)
    cfg0 = replace(model_config, in_channels=stream[0].spec.input_shape[0])
    model: TaskModel = {"modular_grow": ModularNet, "independent": IndependentNets, "finetune_seq": PlainResNet}[method](cfg0)
    rows, info = [], {"outcomes": [], "steps": 0, "seconds": 0.0}
    probes: dict[str, torch.Tensor] = {}
    t0 = time.time()
    for i, task in enumerate(stream):
        if progress:
            print(f"== {method}: task {i + 1}/{len(stream)} {task.name}", flush=True)
        if method == "modular_grow":
            outcome = learn_task(model, task, train_config, grow, progress=progress)
            info["outcomes"].append(asdict(outcome))
            info["steps"] += outcome.steps
            probes[task.name] = probe_logits(model, task)
        else:
            model.add_task(task.spec)
            # Independent networks train only the new task's network; fine-tuning, all of it.
            params = model.param_groups([task.name]) if method == "independent" else None
            Trainer(model, [task], train_config, progress=progress, params=params).fit()
            info["steps"] += train_config.steps
        seen = stream[: i + 1]
        accs = evaluate(model, {t.name: t for t in seen})
        total = model.param_count()
        rows += [Row(method, t.name, "test_acc", round(accs[t.name], 5),
                     {"after_task": task.name, "after_index": i + 1, "params_total": total,
                      "params_task": model.task_param_count(t.name), "seed": train_config.seed}) for t in seen]
    info["seconds"] = round(time.time() - t0, 1)
    if method == "modular_grow":
        info["exact_outputs"] = {t.name: bool(torch.equal(probes[t.name], probe_logits(model, t))) for t in stream}
        info["pool_size"] = len(model.pool)
        info["routes"] = {n: model.route(n).indices() for n in model.task_names}
        save_checkpoint(model, out / f"modular_grow-s{train_config.seed}" / "checkpoint")
    return rows, info


@functools.lru_cache(maxsize=4)
def stream_tasks(names: tuple[str, ...], data_dir: str) -> tuple[TaskData, ...]:
    """The stream's tasks, read once per process."""
    return tuple(load_task(t, data_dir=data_dir or None) for t in names)


def describe(config: ContinualConfig, inputs: dict) -> dict:
    return {**asdict(config), "task_names": [t.name for t in stream_tasks(tuple(config.stream), config.data_dir)]}


def plan(ctx: Context):
    """One pass over the stream per method and seed that `results.json` does not hold; a
    pass's rows and its entry in `methods` are saved together, all there or not at all."""
    config = ctx.config
    tasks = list(stream_tasks(tuple(config.stream), config.data_dir))
    modular = REGIMES[config.regime].apply(config.model, config.train, modules=config.model.num_modules)

    def record(results, output, method: str, seed: int) -> None:
        rows, info = output
        results["methods"].setdefault(method, {})[f"s{seed}"] = info
        results.add(*rows)

    jobs = []
    for seed in config.seeds:
        for method in config.methods:
            if f"s{seed}" in ctx.results["methods"].get(method, {}):
                continue
            model_config, train_config = modular if method == "modular_grow" else (config.model, config.train)
            jobs.append(Job(run_method, (method, tasks, model_config, replace(train_config, seed=seed), config.grow,
                                         ctx.out, ctx.progress),
                            lambda results, out, method=method, seed=seed: record(results, out, method, seed)))
    yield jobs


def final_table(results: dict) -> str:
    """Accuracy of every task after the last one, and right after it was learned, mean over
    seeds; then the mean of each seed, the parameters and the training steps."""
    stream = results["config"]["task_names"]
    methods = [m for m in results["config"]["methods"] if m in results["methods"]]
    last: dict[tuple, list] = {}
    first: dict[tuple, list] = {}
    for r in results["rows"]:
        if r["after_index"] == len(stream):
            last.setdefault((r["method"], r["task"]), []).append(r)
        if r["after_task"] == r["task"]:
            first.setdefault((r["method"], r["task"]), []).append(r["value"])

    def acc(m: str, t: str) -> float:
        return float(np.mean([r["value"] for r in last[(m, t)]]))

    body = [[t, *(f"{100 * acc(m, t):.1f} ({100 * np.mean(first[(m, t)]):.1f})" for m in methods)] for t in stream]
    means = [f"**{100 * np.mean([acc(m, t) for t in stream]):.1f}** "
             f"({100 * np.mean([np.mean(first[(m, t)]) for t in stream]):.1f})" for m in methods]
    body.append(["**mean**", *means])
    # A run that has not finished every pass has methods with fewer seeds than others:
    # each cell lists the seeds its method has, in order.
    seeds = {m: sorted({r["seed"] for t in stream for r in last[(m, t)]}) for m in methods}
    every_seed = sorted(set().union(*seeds.values()))
    if any(len(s) > 1 for s in seeds.values()):
        body.append(["mean, each seed", *(" / ".join(
            f"{100 * np.mean([r['value'] for t in stream for r in last[(m, t)] if r['seed'] == s]):.1f}"
            for s in seeds[m]) + ("" if seeds[m] == every_seed else
                                  f" (seed{'s' if len(seeds[m]) > 1 else ''} {', '.join(map(str, seeds[m]))})")
            for m in methods)])
    body.append(["params at the end", *(f"{np.mean([r['params_total'] for r in last[(m, stream[-1])]]):,.0f}"
                                        for m in methods)])
    body.append(["training steps", *(f"{np.mean([info['steps'] for info in results['methods'][m].values()]):,.0f}"
                                     for m in methods)])
    return "\n".join(md_table(["task", *(f"{m} end (just learned)" for m in methods)], body, "l" + "r" * len(methods)))


def write_report(out: Path, results: dict) -> Path:
    cfg = results["config"]
    rows = results["rows"]
    parts = ["# isomod bench continual", "",
             f"{len(cfg['task_names'])} tasks arrive one by one; each training run is {cfg['train']['steps']} steps of "
             f"{cfg['train']['batch_size']} images. `modular_grow` starts with {cfg['model']['num_modules']} modules; "
             f"a task whose route over the frozen pool scores below {cfg['grow']['threshold']:.0%} on validation data "
             f"gets {cfg['grow']['modules']} fresh modules (a second run). Test accuracy (%) after the last task, and in "
             "brackets right after the task was learned:", "", final_table(results), ""]
    grows = results["methods"].get("modular_grow", {})
    if grows:
        exact = [e for g in grows.values() for e in g["exact_outputs"].values()]
        sizes = " / ".join(str(g["pool_size"]) for g in grows.values())
        first_seed, grow = next(iter(grows.items()))
        parts += [f"`modular_grow` ({cfg.get('regime', 'annealed')} regime): earlier tasks' logits after the last "
                  f"task are bit-identical to those right after learning them for {sum(exact)} of {len(exact)} "
                  f"tasks over all seeds; final pool {sizes} modules (each seed). Seed {first_seed[1:]}:", ""]
        body = [[o["task"], "yes" if o["grew"] else "no", o["modules_added"],
                 "" if o["val_route"] is None else f"{100 * o['val_route']:.1f}",
                 "" if o["val_grown"] is None else f"{100 * o['val_grown']:.1f}",
                 f"{100 * o['test_acc']:.1f}", " ".join(map(str, o["route"]))] for o in grow["outcomes"]]
        parts += md_table(["task", "grew", "modules added", "val acc, route over frozen pool", "val acc, grown",
                           "test acc", "route (argmax when soft)"], body, "llrrrrl") + [""]
    plot_continual(rows, cfg["task_names"], out / "continual.png")
    parts += ["![accuracy and parameters along the stream](continual.png)", ""]
    plot_forgetting(rows, cfg["task_names"], out / "forgetting.png")
    parts += ["Test accuracy of each task (row) after each task of the stream (column):", "",
              "![forgetting](forgetting.png)", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def plot_continual(rows: list[dict], stream: list[str], path: Path) -> Path:
    """Mean test accuracy over the tasks seen so far, and total parameters, after each
    task of a stream; one line per method, mean over seeds."""
    plt = report.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = range(1, len(stream) + 1)
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        acc = [100 * np.mean([r["value"] for r in sel if r["after_index"] == i]) for i in steps]
        params = [np.mean([r["params_total"] for r in sel if r["after_index"] == i and r["task"] == stream[i - 1]])
                  for i in steps]
        ax1.plot(steps, acc, marker="o", label=method)
        ax2.plot(steps, params, marker="o", label=method)
    ax1.set_ylabel("mean test accuracy, tasks so far (%)")
    ax2.set_ylabel("parameters")
    for ax in (ax1, ax2):
        ax.set_xlabel("tasks learned")
        ax.set_xticks(list(steps))
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return report.save_figure(fig, path)


def plot_forgetting(rows: list[dict], stream: list[str], path: Path) -> Path:
    """Per method, a tasks x stream-position map of test accuracy, mean over seeds (blank
    before a task arrives)."""
    plt = report.pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 + 3.0 * len(methods), 0.8 + 0.35 * len(stream)),
                             squeeze=False)
    short = [t.rsplit("/", 1)[-1] for t in stream]
    for ax, method in zip(axes[0], methods):
        total, count = np.zeros((len(stream), len(stream))), np.zeros((len(stream), len(stream)))
        for r in rows:
            if r["method"] == method:
                total[stream.index(r["task"]), r["after_index"] - 1] += 100 * r["value"]
                count[stream.index(r["task"]), r["after_index"] - 1] += 1
        acc = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=100)
        for i in range(len(stream)):
            for j in range(len(stream)):
                if not np.isnan(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if acc[i, j] < 50 else "black")
        ax.set_title(method, fontsize=10)
        ax.set_xticks(range(len(stream)), range(1, len(stream) + 1), fontsize=7)
        ax.set_yticks(range(len(stream)), short if ax is axes[0][0] else [""] * len(stream), fontsize=7)
        ax.set_xlabel("after task", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02)
    return report.save_figure(fig, path, tight=False)


BENCH = register(Bench("continual", "a stream of tasks: growing pool vs independent networks vs sequential "
                       "fine-tuning", ContinualConfig, plan, write_report, final_table, describe=describe,
                       device=lambda c: c.train.device, extra=("methods",), hidden=("train.seed",)))
run = BENCH.run
