"""`isomod bench mtl`: the modular network against independent networks and a shared
trunk, on one suite, same data, same steps, same batch size, same schedule."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from isomod.bench import report
from isomod.methods import diagnostics
from isomod.core.baselines import IndependentNets, PlainResNet
from isomod.data.tasks import TaskData, load_suite, resolve, split_validation
from isomod.bench.base import Bench, Context, Job, check_seeds, register
from isomod.bench.docs import md_table
from isomod.bench.metrics import loss_fifths, read_log
from isomod.bench.results import Row
from isomod.bench.workers import check_jobs
from isomod.core.network import ModelConfig, ModularNet, TaskModel
from isomod.errors import IsomodError, check_choices
from isomod.training.regimes import DEFAULT_REGIME, REGIMES
from isomod.training.trainer import TrainConfig, Trainer
from isomod.files import write_text_atomic
from isomod import seeds

# `modular` trains with the default regime, `modular_<regime>` with another (isomod.training.regimes).
METHODS = {"modular": ModularNet, **{f"modular_{r}": ModularNet for r in REGIMES if r != DEFAULT_REGIME},
           "independent": IndependentNets, "shared_trunk": PlainResNet}


def routes_key(method: str, seed: int) -> str:
    """Where a modular method's routes of one seed are kept in `results["routes"]`."""
    return f"s{seed}" if method == "modular" else f"{method}-s{seed}"


def run_dir(out: Path, method: str, seed: int) -> Path:
    """The run folder (log, checkpoint) of one method and seed."""
    return out / "runs" / f"{method}-s{seed}"


def learned_routes(results: dict, seed: int, method: str = "modular") -> dict[str, list[int]]:
    """Each task's route a modular method learned with `seed`: the module per step."""
    return results["routes"][routes_key(method, seed)]["discrete"]


def regime_of(method: str) -> str | None:
    """The route regime a modular method trains with (None for the baselines)."""
    if method == "modular":
        return DEFAULT_REGIME
    return method.removeprefix("modular_") if method.startswith("modular_") else None


def method_configs(method: str, model: ModelConfig, train: TrainConfig, modules: int
                   ) -> tuple[ModelConfig, TrainConfig]:
    """The model and budget a method trains with: a modular method's regime applied to the
    shared configs (a pool of `modules` modules, or the regime's own size when 0); the
    baselines take the configs as they are."""
    name = regime_of(method)
    return REGIMES[name].apply(model, train, modules or None) if name else (model, train)


@dataclass
class MtlConfig:
    """`isomod bench mtl`: every method, every seed, one suite, one budget.

    Args:
        suite: the task suite (`isomod tasks` lists them).
        seeds: one run per seed and method.
        methods: a subset of modular (the default route regime), modular_<regime> for
            the others in `isomod.training.regimes`, independent, shared_trunk.
        modules: pool size of every modular method; 0 gives each regime its own.
        validation: hold out this fraction of every task's training images and report
            accuracy on them (`val_acc`) instead of the test split: the split on which
            hyper-parameters are chosen. 0 reports `test_acc`.
        diagnostics_images: the route diagnostics score this many test images of each task
            (a fixed random sample; 0: all of them).
        jobs: training runs side by side, each in its own process with an equal share
            of the threads (the thread count changes a run's numbers: `environment`
            in `results.json` records it).
        model: the shape shared by all methods (baselines run `steps` distinct blocks);
            each modular method's regime sets its pool and route fields. 4x4 patches
            (7x7 feature maps) keep a 10,000-step run to 40 to 60 minutes on one CPU thread
            (two runs side by side on 2 cores).
        train: the budget shared by all methods; its seed is replaced per run. Over the
            last 2,000 of 10,000 steps of 128 images (about 30 epochs of each task),
            validation accuracy moved by 0.5 points or less in every route regime
            (docs/results/mtl-regimes.md).
    """

    suite: str = "glyphs"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: ["modular", "independent", "shared_trunk"])
    modules: int = 0
    validation: float = 0.0
    diagnostics_images: int = 0
    jobs: int = 1
    model: ModelConfig = field(default_factory=lambda: ModelConfig(channels=32, num_modules=16, steps=8, stem_stride=4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=10000, batch_size=128, lr=5e-3, lr_heads=5e-3, eval_every=2000, checkpoint_every=2000, log_every=50))

    def __post_init__(self):
        check_choices("mtl method", self.methods, tuple(METHODS))
        if self.modules < 0:
            raise IsomodError(f"modules must be >= 0 (0: each regime's own pool size), got {self.modules}")
        if not 0 <= self.validation < 1:
            raise IsomodError(f"validation must lie in [0, 1), got {self.validation}")
        if self.diagnostics_images < 0:
            raise IsomodError(f"diagnostics_images must be >= 0 (0: all), got {self.diagnostics_images}")
        check_jobs(self.jobs)
        check_seeds(self.seeds)


def rows_for(method: str, model: TaskModel, accs: dict[str, float], seed: int, metric: str = "test_acc") -> list[Row]:
    total, block = model.param_count(), model.config.block
    rows = [Row(method, t, metric, round(a, 5), {"params_total": total, "params_task": model.task_param_count(t),
                                                 "seed": seed, "block": block}) for t, a in accs.items()]
    rows.append(Row(method, "mean", metric, round(float(np.mean(list(accs.values()))), 5),
                    {"params_total": total, "params_task": int(np.mean([r.fields["params_task"] for r in rows])),
                     "seed": seed, "block": block}))
    return rows


def diagnostic_rows(method: str, model: TaskModel, tasks: dict[str, TaskData], seed: int
                    ) -> tuple[list[Row], dict]:
    """Whether the routes carry the tasks (see `isomod.methods.diagnostics`): the mean route
    distance, the cross-route matrix's diagonal and off-diagonal means, and each task's
    accuracy with its route's steps shuffled; and the cross-route matrix itself."""
    common = {"params_total": model.param_count(), "seed": seed, "block": model.config.block}
    d = diagnostics.summary(model, tasks, seed=seed)
    shuffled = d["shuffled"]
    rows = [Row(method, "mean", "route_distance", round(d["route_distance"], 5), common)]
    rows += [Row(method, t, "shuffled_acc", round(a, 5), common) for t, a in shuffled.items()]
    rows += [Row(method, "mean", "shuffled_acc", round(sum(shuffled.values()) / len(shuffled), 5), common),
             Row(method, "mean", "cross_route_own", round(d["own"], 5), common),
             Row(method, "mean", "cross_route_other", round(d["other"], 5), common)]
    return rows, {"tasks": d["names"], "acc": d["cross_route"].round(decimals=5).tolist()}


def describe(config: MtlConfig, inputs: dict) -> dict:
    return {**asdict(config), "tasks": resolve([config.suite]), "default_regime": DEFAULT_REGIME}


def plan(ctx: Context):
    """One job per method and seed not in the results yet. `ctx.inputs["tasks"]`: the
    suite's tasks themselves, instead of loading them (the demo)."""
    config = ctx.config
    tasks = ctx.inputs.get("tasks") or load_suite(config.suite)
    if config.validation:
        tasks = [split_validation(t, config.validation) for t in tasks]
    metric = "val_acc" if config.validation else "test_acc"

    def record(results, output) -> None:
        method, seed, rows, routes, seconds = output
        results["train_seconds"][f"{method}-s{seed}"] = seconds
        results.add(*rows)
        if routes is not None:
            results["routes"][routes_key(method, seed)] = routes
        if config.jobs > 1:
            mean = next(r.value for r in rows if r.metric == metric and r.task == "mean")
            ctx.say(f"== {method} (seed {seed}): {metric} {100 * mean:.1f}, {seconds:.0f} s")

    yield [Job(train_one, (method, seed, config, tasks, ctx.out, metric, ctx.progress), record)
           for seed in config.seeds for method in config.methods
           if not ctx.results.has(method=method, seed=seed, metric=metric)]


def run(out_dir: str | Path, config: MtlConfig = MtlConfig(), progress: bool = True,
        tasks: list[TaskData] | None = None) -> dict:
    """Train every method for every seed; write `results.json`, figures and `report.md`.

    Args:
        out_dir: output folder; each run keeps its checkpoint and log under `runs/`.
        config: suite, seeds, methods, model shape and budget.
        progress: show progress.
        tasks: the tasks themselves, instead of loading the suite.
    """
    return BENCH.run(out_dir, config, progress, **({"tasks": tasks} if tasks is not None else {}))


def train_one(method: str, seed: int, config: MtlConfig, tasks: list[TaskData], out: Path, metric: str,
              progress: bool) -> tuple[str, int, list[Row], dict | None, float]:
    """Train one method with one seed in `out/runs/{method}-s{seed}`; its rows, its routes
    and route diagnostics (None for the baselines) and its training seconds."""
    model_config, train_config = method_configs(method, config.model, config.train, config.modules)
    seeds.seed(seed)
    model = METHODS[method](model_config, [t.spec for t in tasks])
    if progress:
        print(f"== {method} (seed {seed}): {model.param_count():,} parameters", flush=True)
    trainer = Trainer(model, tasks, replace(train_config, seed=seed), out_dir=run_dir(out, method, seed),
                      progress=progress)
    t0 = time.time()
    accs = trainer.fit(resume="auto")  # a run a stopped bench left half done goes on from its checkpoint
    seconds = round(time.time() - t0, 1)
    rows = rows_for(method, model, accs, seed, metric) + convergence_rows(method, trainer.history, seed)
    if not model.has_routes:
        return method, seed, rows, None, seconds
    routes = {"discrete": {n: model.route(n).indices() for n in model.task_names},
              "soft_at_discretize": trainer.soft_usage,
              "final": {n: w.tolist() for n, w in model.usage().items()}}
    probe = {t.name: sample_test(t, config.diagnostics_images) for t in tasks}
    diag, routes["cross_route"] = diagnostic_rows(method, model, probe, seed)
    return method, seed, rows + diag, routes, seconds


def sample_test(task: TaskData, images: int) -> TaskData:
    """`task` with a fixed random `images` of its test images (all of them when 0)."""
    if not 0 < images < len(task.y_test):
        return task
    keep = torch.randperm(len(task.y_test), generator=torch.Generator().manual_seed(0))[:images]
    return replace(task, x_test=task.x_test[keep], y_test=task.y_test[keep])


def diagnostics_table(rows: list[dict]) -> str:
    """One line per modular method: the route diagnostics, mean over seeds (% for accuracies)."""
    metrics = ("route_distance", "cross_route_own", "cross_route_other", "shuffled_acc")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["metric"] in metrics))
    if not methods:
        return ""
    body = []
    for m in methods:
        vals = [float(np.mean([r["value"] for r in rows if r["method"] == m and r["metric"] == k and r["task"] == "mean"]))
                for k in metrics]
        body.append([m, f"{vals[0]:.3f}", *(f"{100 * v:.1f}" for v in vals[1:])])
    return "\n".join(md_table(["method", "route distance", "cross-route own", "cross-route other", "shuffled"], body,
                               "lrrrr"))


def accuracy_metric(config: dict) -> str:
    """`val_acc` for a run on validation splits, `test_acc` otherwise."""
    return "val_acc" if config.get("validation") else "test_acc"


def convergence_rows(method: str, records: list[dict], seed: int) -> list[Row]:
    fifths = loss_fifths(records)
    if fifths is None:
        return []
    return [Row(method, "mean", "loss_fourth_fifth", round(fifths[0], 5), {"seed": seed}),
            Row(method, "mean", "loss_last_fifth", round(fifths[1], 5), {"seed": seed})]


def evaluation_table(logs: dict[str, list[dict]]) -> str:
    """Runs as rows, evaluation steps as columns: mean accuracy over tasks (%)."""
    evals = {name: {r["step"]: float(np.mean(list(r["test_acc"].values()))) for r in records
                    if r.get("event") == "eval"} for name, records in logs.items()}
    evals = {name: e for name, e in evals.items() if e}
    if not evals:
        return ""
    steps = sorted({s for e in evals.values() for s in e})
    body = [[name, *(f"{100 * e[s]:.1f}" if s in e else "" for s in steps)] for name, e in evals.items()]
    return "\n".join(md_table(["run", *(f"{s:,}" for s in steps)], body, "l" + "r" * len(steps)))


def convergence_table(rows: list[dict]) -> str:
    """Per method: the training loss over the fourth and the last fifth of training, each
    seed, and the relative change between them."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["metric"] == "loss_last_fifth"))
    if not methods:
        return ""
    body = []
    for m in methods:
        fourth = {r["seed"]: r["value"] for r in rows if r["method"] == m and r["metric"] == "loss_fourth_fifth"}
        last = {r["seed"]: r["value"] for r in rows if r["method"] == m and r["metric"] == "loss_last_fifth"}
        seeds = sorted(set(fourth) & set(last))
        change = np.mean([(last[s] - fourth[s]) / fourth[s] for s in seeds])
        body.append([m, " / ".join(f"{fourth[s]:.3f}" for s in seeds), " / ".join(f"{last[s]:.3f}" for s in seeds),
                     f"{100 * change:+.1f}%"])
    return "\n".join(md_table(["method", "loss, 4th fifth", "loss, last fifth", "change"], body, "lllr"))


def summary(results: dict) -> str:
    rows = results["rows"]
    parts = [report.markdown_results(rows, accuracy_metric(results["config"])), diagnostics_table(rows),
             convergence_table(rows)]
    return "\n\n".join(p for p in parts if p)


def write_report(out: Path, results: dict) -> Path:
    """Draw the figures and write `report.md` from `results` (as in `results.json`)."""
    rows = results["rows"]
    cfg = results["config"]
    metric = accuracy_metric(cfg)
    what = (f"Validation accuracy (%) on {100 * cfg['validation']:.0f}% of each task's training images, held out"
            if metric == "val_acc" else "Test accuracy (%) on held-out data")
    parts = [f"# isomod bench {results['bench']}: {cfg['suite']}", "",
             f"{what}, mean over seeds {cfg['seeds']}; every method trained "
             f"{cfg['train']['steps']} steps of {cfg['train']['batch_size']} images with the same schedule.", "",
             report.markdown_results(rows, metric), ""]
    report.plot_task_accuracy(rows, out / "accuracy.png", metric)
    parts += ["![accuracy per task](accuracy.png)", ""]
    logs = {p.parent.name: read_log(p) for p in sorted((out / "runs").glob("*/log.jsonl"))}
    if logs:
        plot_curves(logs, out / "curves.png")
        parts += ["## Training curves", "", "![training curves](curves.png)", ""]
    during = evaluation_table(logs)
    if during:
        parts += ["## Accuracy during training", "",
                  f"Mean {'validation' if metric == 'val_acc' else 'test'} accuracy (%) over tasks at each evaluation "
                  "of each run (one cosine schedule over the whole budget, so an early figure is not what a run of "
                  "that length would reach).", "", during, ""]
    converged = convergence_table(rows)
    if converged:
        parts += ["## Has training converged?", "",
                  "Mean training loss (running average of the batches) over the fourth and the last fifth of "
                  "the steps, each seed; a converged run changes little between them.", "", converged, ""]
    diag = diagnostics_table(rows)
    if diag:
        parts += ["## Does the route carry the task?", "",
                  "Mean over seeds. Route distance: mean pairwise total variation of the tasks' route weights "
                  "(0: identical routes). Cross-route: each task run with every task's route, its own norms and "
                  "head; own = the diagonal's mean, other = the off-diagonal's. Shuffled: each task with its "
                  "route's steps in a random other order.", "", diag, ""]
    first = next(iter(results.get("routes", {}).values()), None)
    if first:
        discrete = first["discrete"]
        n_modules = len(next(iter(first["final"].values()))[0]) if first.get("final") else cfg["model"]["num_modules"]
        onehot = {n: np.eye(n_modules)[r] for n, r in discrete.items()}
        parts += ["## Routes", "", "Discrete routes (module index per step):", "", "```"]
        parts += [f"{n}: {' '.join(map(str, r))}" for n, r in discrete.items()] + ["```", ""]
        soft = first.get("soft_at_discretize")
        if not soft and first.get("final") and any(np.max(w) < 1 for w in first["final"].values()):
            soft = first["final"]  # routes soft to the end
        if soft:
            report.plot_usage(soft, out / "usage.png", chosen=discrete)
            parts += ["Module-usage maps: soft route weights (just before discretisation, or at the end when "
                      "routes stay soft), the largest marked by a dot.", "", "![module usage](usage.png)", ""]
        plot_similarity(soft or onehot, out / "similarity.png")
        what = ("soft routes" if soft else "discrete routes")
        parts += [f"Task similarity from the {what}: the probability that two tasks run the same module "
                  "at a step, averaged over steps.", "", "![task similarity](similarity.png)", ""]
    parts += report.markdown_times(results.get("train_seconds", {}))
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def plot_similarity(usage: dict[str, np.ndarray], path: Path, title: str = "task similarity from routes") -> Path:
    plt = report.pyplot()
    names, sim = report.route_similarity(usage)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.6 + 0.6 * len(names)))
    im = ax.imshow(sim, cmap="viridis", vmin=0, vmax=1)
    short = [n.rsplit("/", 1)[-1] for n in names]
    ax.set_xticks(range(len(names)), short, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), short, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if sim[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=10)
    return report.save_figure(fig, path)


def plot_curves(logs: dict[str, list[dict]], path: Path) -> Path:
    """Training loss and mean running train accuracy against step, one line per run."""
    plt = report.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, records in logs.items():
        rec = [r for r in records if "loss" in r]
        if not rec:
            continue
        steps = [r["step"] for r in rec]
        ax1.plot(steps, [r["loss"] for r in rec], label=label)
        ax2.plot(steps, [np.mean(list(r["train_acc"].values())) for r in rec], label=label)
        for r in records:
            if r.get("event") == "discretize":
                ax1.axvline(r["step"], color="gray", ls=":", lw=1)
    ax1.set(xlabel="step", ylabel="training loss (EMA)", yscale="log")
    ax2.set(xlabel="step", ylabel="train accuracy (running, mean over tasks)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    return report.save_figure(fig, path)


BENCH = register(Bench("mtl", "modular vs independent networks vs a shared trunk", MtlConfig, plan, write_report,
                       summary, describe=describe, device=lambda c: c.train.device, hidden=("train.seed", "model.num_modules"),
                       extra=("routes", "train_seconds")))
