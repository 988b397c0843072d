"""`isomod bench reuse`: block reuse for one task, at equal parameters.

A single-task ModularNet whose `L` steps run a pool of `N` modules. The methods differ
only in the route, so any difference in accuracy comes from the order modules run in:

    once          L = N, modules 0 1 2 3 run once each (the base network)
    cyclic        0 1 2 3 0 1 2 3 (L = 2N)
    block_repeat  0 0 1 1 2 2 3 3
    learned       a soft route over the N modules, annealed, then discretised
    templates     the N modules as templates mixed softly at every step (soft parameter
                  sharing, Savarese & Maire 2019): the `templates` regime of `isomod.training.regimes`
    distinct      L modules 0 .. L-1 run once each: the upper reference, L/N times the parameters

Parameters and multiply-adds per image are counted from the trained model; every run
shares data, steps, batch size and schedule. With `torchrun --nproc_per_node=P` the same
command trains data-parallel (see `isomod.distributed`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from isomod import distributed
from isomod.bench import report
from isomod.bench.models import train_modular
from isomod.bench.base import Bench, Context, Job, check_seeds, register
from isomod.bench.docs import md_table
from isomod.bench.metrics import loss_fifths, macs_per_image, read_log
from isomod.bench.results import Row
from isomod.bench.workers import check_jobs
from isomod.data.tasks import TaskData, load_task
from isomod.errors import IsomodError, check_choice, check_choices
from isomod.core.network import ModelConfig
from isomod.training.regimes import REGIMES
from isomod.training.trainer import TrainConfig
from isomod.files import write_text_atomic

REUSE_METHODS = ("once", "cyclic", "block_repeat", "learned", "templates", "distinct")
LEARNED = ("learned", "templates")
PATTERNS = ("once", "cyclic", "block_repeat", "distinct")


def reuse_pattern(kind: str, num_modules: int, steps: int) -> list[int]:
    """A fixed route over `steps` steps: `once` and `distinct` run modules 0 .. steps-1
    (a pool of `steps` modules), `cyclic` runs 0 1 .. N-1 0 1 .., and `block_repeat`
    runs each of the `N` modules for about `steps / N` consecutive steps."""
    check_choice("route pattern", kind, PATTERNS)
    if kind in ("once", "distinct"):
        return list(range(steps))
    if kind == "cyclic":
        return [l % num_modules for l in range(steps)]
    return [l * num_modules // steps for l in range(steps)]


@dataclass
class ReuseConfig:
    """`isomod bench reuse`: every planned `(method, N, L)` for every seed.

    Args:
        task: a registered task (fashion-mnist; glyphs/all is the harder 216-class one),
            a folder of class sub-folders of images, or an `.npz`.
        data_dir: where Fashion-MNIST is looked for first.
        image_size: side a folder's images are resized to.
        modules: pool sizes N.
        multiples: route lengths L as multiples of N (1 runs `once`, above 1 the others).
        methods: a subset of once, cyclic, block_repeat, learned, templates, distinct.
        seeds: one run per seed.
        jobs: training runs side by side, each in its own process with an equal share of
            the threads (not under torchrun).
        model: width and block shape; `num_modules`, `steps` and `in_channels` are set per run.
            4x4-pixel patches (`stem_stride` 4), as in `bench transfer`: a quarter of a
            stride-2 stem's compute per step.
        train: the budget every run shares; its seed is replaced per run.
    """

    task: str = "fashion-mnist"
    data_dir: str = ""
    image_size: int = 28
    modules: list[int] = field(default_factory=lambda: [4])
    multiples: list[int] = field(default_factory=lambda: [1, 2])
    methods: list[str] = field(default_factory=lambda: list(REUSE_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    jobs: int = 1
    model: ModelConfig = field(default_factory=lambda: ModelConfig(channels=16, stem_stride=4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=64, lr=5e-3, lr_heads=5e-3, augment=False, checkpoint_every=500, log_every=25))

    def __post_init__(self):
        check_choices("reuse method", self.methods, REUSE_METHODS)
        if self.image_size < 1:
            raise IsomodError(f"image size must be >= 1, got {self.image_size}")
        check_seeds(self.seeds)
        check_jobs(self.jobs)


def pool_size(method: str, num_modules: int, steps: int) -> int:
    """How many modules the method's pool holds: `L` for `distinct`, `N` otherwise."""
    return steps if method == "distinct" else num_modules


def grid(modules: list[int], multiples: list[int], methods: list[str]) -> list[tuple[str, int, int]]:
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


@functools.lru_cache(maxsize=2)
def reuse_data(task: str, data_dir: str, image_size: int) -> TaskData:
    """The bench's task, read once per process."""
    return load_task(task, data_dir=data_dir or None, image_size=image_size)


def bench_data(config: ReuseConfig, inputs: dict) -> TaskData:
    """`inputs["data"]` (the task's data given directly), or `config.task` loaded."""
    return inputs.get("data") or reuse_data(config.task, config.data_dir, config.image_size)


def describe(config: ReuseConfig, inputs: dict) -> dict:
    data = bench_data(config, inputs)
    return {**asdict(config), "task": data.name, "num_classes": data.spec.num_classes,
            "input_shape": list(data.spec.input_shape),
            "model": asdict(replace(config.model, in_channels=data.spec.input_shape[0])),
            "world_size": distributed.world_size()}


def plan(ctx: Context):
    """One job per planned `(method, N, L)` and seed not in the results. Each run keeps its
    checkpoint and log under `OUT/runs/`; a run whose checkpoint is complete is reloaded,
    not trained again. `ctx.inputs["data"]`: the task's data itself, instead of loading
    `config.task`. Under torchrun, rank 0 alone prints and writes."""
    config = ctx.config
    data = bench_data(config, ctx.inputs)
    runs = grid(list(config.modules), list(config.multiples), list(config.methods))
    base = replace(config.model, in_channels=data.spec.input_shape[0])
    ctx.say(f"bench reuse: {data.name}, {data.spec.num_classes} classes, {len(data.y_train):,} train / "
            f"{len(data.y_test):,} test images of {data.spec.input_shape}; {len(runs)} runs x {len(config.seeds)} "
            f"seed(s)")

    def record(results, output) -> None:
        name, rows, route, seconds = output
        results.add(*rows)
        results["routes"][name], results["train_seconds"][name] = route, seconds
        acc = next(r.value for r in rows if r.metric == "test_acc")
        ctx.say(f"   {name}: test acc {100 * acc:.2f}%, route {' '.join(map(str, route))}, {seconds} s")

    yield [Job(train_one, (method, n, steps, seed, base, config.train, data, ctx.out, ctx.progress), record)
           for seed in config.seeds for method, n, steps in runs
           if not ctx.results.has(method=method, N=n, L=steps, seed=seed)]


def train_one(method: str, n: int, steps: int, seed: int, base: ModelConfig, train_config: TrainConfig,
              data: TaskData, out: Path, progress: bool) -> tuple[str, list[Row], list[int], float]:
    """Train (or reload) one `(method, N, L, seed)` run; its name, rows, route and seconds."""
    name = f"{method}-N{n}-L{steps}-s{seed}"
    shape = replace(base, num_modules=pool_size(method, n, steps), steps=steps)
    budget = train_config
    if method == "templates":
        shape, budget = REGIMES["templates"].apply(shape, train_config, modules=n)
    pattern = None if method in LEARNED else reuse_pattern(method, n, steps)
    if progress and distributed.is_main():
        print(f"== {name}: route {' '.join(map(str, pattern)) if pattern else method}", flush=True)
    t0 = time.time()
    model, accs = train_modular(out / "runs" / name, [data], shape, budget, seed, progress,
                                routes={data.name: pattern} if pattern else None)
    seconds = round(time.time() - t0, 1)
    common = {"N": n, "L": steps, "block": shape.block, "params_total": model.param_count(),
              "params_task": model.task_param_count(data.name), "seed": seed}
    rows = [Row(method, data.name, "test_acc", round(accs[data.name], 5), common),
            Row(method, data.name, "macs", macs_per_image(model, data.name), common)]
    fifths = loss_fifths(read_log(out / "runs" / name / "log.jsonl"))
    if fifths is not None:
        rows += [Row(method, data.name, "loss_fourth_fifth", round(fifths[0], 5), common),
                 Row(method, data.name, "loss_last_fifth", round(fifths[1], 5), common)]
    return name, rows, model.route(data.name).indices(), seconds


def grouped(rows: list[dict]) -> list[dict]:
    """One entry per `(N, L, method)`: mean and spread (max - min) of test accuracy over
    seeds, parameters, multiply-adds and the mean training loss over the fourth and the
    last fifth of the steps, in the order the runs were made."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["N"], r["L"], r["method"])
        g = groups.setdefault(key, {"N": r["N"], "L": r["L"], "method": r["method"], "acc": [],
                                    "params": r["params_total"], "macs": 0, "loss_fourth_fifth": [],
                                    "loss_last_fifth": []})
        if r["metric"] == "test_acc":
            g["acc"].append(r["value"])
        elif r["metric"] == "macs":
            g["macs"] = r["value"]
        elif r["metric"] in ("loss_fourth_fifth", "loss_last_fifth"):
            g[r["metric"]].append(r["value"])
    out = []
    for g in groups.values():
        acc = np.array(g.pop("acc"))
        losses = {k: float(np.mean(g.pop(k))) if g[k] else None for k in ("loss_fourth_fifth", "loss_last_fifth")}
        out.append({**g, **losses, "mean": float(acc.mean()), "spread": float(acc.max() - acc.min()),
                    "seeds": len(acc)})
    return out


def markdown_table(results: dict) -> str:
    body = []
    for s in sorted(grouped(results["rows"]), key=lambda s: (s["N"], s["L"], REUSE_METHODS.index(s["method"]))):
        loss = (f"{s['loss_fourth_fifth']:.3f} / {s['loss_last_fifth']:.3f}" if s["loss_last_fifth"] is not None
                else "")
        body.append([s["N"], s["L"], s["method"], f"{100 * s['mean']:.2f}", f"{100 * s['spread']:.2f}", f"{s['params']:,}",
                     f"{s['macs'] / 1e6:.2f}", loss])
    return "\n".join(md_table(["N", "L", "method", "test acc (%)", "spread", "params", "MMACs / image",
                               "loss, 4th / last fifth"], body, "rrlrrrrr"))


def checks(results: dict) -> list[str]:
    """For each pool size and reuse method at `L = 2N`: its gain over `once` against the
    larger of the two seed spreads (above, below or within it), and the share of
    `distinct`'s gain it recovers when `distinct` gains more than its own spread (a share
    of a gain inside the noise means nothing)."""
    table = {(s["N"], s["L"], s["method"]): s for s in grouped(results["rows"])}
    lines = []
    for (n, steps, method), s in table.items():
        base, ref = table.get((n, n, "once")), table.get((n, steps, "distinct"))
        if steps != 2 * n or method in ("once", "distinct") or base is None:
            continue
        gain = s["mean"] - base["mean"]
        spread = max(s["spread"], base["spread"])
        verdict = ("beats once" if gain > spread else "below once by more than the spread" if gain < -spread
                   else "within the spread")
        text = (f"N={n}, L={steps}, {method}: {100 * s['mean']:.2f} vs once {100 * base['mean']:.2f} "
                f"({100 * gain:+.2f}, seed spread {100 * spread:.2f}: {verdict})")
        if ref is not None:
            ref_gain, ref_spread = ref["mean"] - base["mean"], max(ref["spread"], base["spread"])
            if ref_gain > ref_spread:
                text += f"; distinct gains {100 * ref_gain:+.2f}, reuse recovers {100 * gain / ref_gain:.0f}%"
            else:
                text += (f"; distinct gains {100 * ref_gain:+.2f}, not above its seed spread "
                         f"{100 * ref_spread:.2f}: no gain to recover")
        lines.append(text)
    return lines


def write_report(out: Path, results: dict) -> Path:
    """Draw the figure and write `report.md` from `results` (as in `results.json`)."""
    cfg = results["config"]
    summ = grouped(results["rows"])
    plot_reuse(summ, out / "reuse.png", title=f"block reuse on {cfg['task']}")
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
    write_text_atomic(path, "\n".join(parts))
    return path


def summary(results: dict) -> str:
    """The table, then the checks as a list (a line right under a table would join it)."""
    return "\n".join([markdown_table(results), "", *(f"- {line}" for line in checks(results))])


REUSE_STYLE = {"once": "black", "cyclic": "tab:red", "block_repeat": "tab:orange", "learned": "tab:green",
               "templates": "tab:purple",
               "distinct": "tab:blue"}


def plot_reuse(summary: list[dict], path: Path, title: str = "block reuse") -> Path:
    """Test accuracy against parameters and against multiply-adds per image. `once` is one
    line over the pool sizes; every other method has a line per pool size N (solid for the
    first N, dashed for the next) that starts at `once` with that N. Error bars: half the
    seed spread."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), sharey=True)
    sizes = sorted({s["N"] for s in summary})
    styles = ["-", "--", ":", "-."]
    for ax, key, label in zip(axes, ("params", "macs"), ("parameters", "multiply-adds per image")):
        for method, color in REUSE_STYLE.items():
            lines = [[s for s in summary if s["method"] == "once"]] if method == "once" else [
                [s for s in summary if s["method"] == "once" and s["N"] == n]
                + [s for s in summary if s["method"] == method and s["N"] == n] for n in sizes]
            for i, pts in enumerate(lines):
                pts = sorted(pts, key=lambda s: (s["N"], s["L"]))
                if len(pts) < (1 if method == "once" else 2):
                    continue
                ax.errorbar([p[key] for p in pts], [100 * p["mean"] for p in pts], yerr=[50 * p["spread"] for p in pts],
                            color=color, ls="-" if method == "once" else styles[i % len(styles)],
                            marker="s" if method == "once" else "o", ms=5 if method == "once" else 4, capsize=2,
                            lw=2 if method == "once" else 1.2, zorder=3 if method == "once" else 2,
                            label=method if method == "once" else f"{method}, N={sizes[i]}")
                for p in pts:
                    if method != "once" or ax is axes[0]:
                        ax.annotate(f"N={p['N']}" if method == "once" else f"L={p['L']}", (p[key], 100 * p["mean"]),
                                    fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"{title} (error bars: half the seed spread)", fontsize=10)
    return report.save_figure(fig, path)


BENCH = register(Bench("reuse", "block reuse for one task: N modules run over L = N, 2N, ... steps (cyclic, "
                       "block-repeat, learned, soft templates) vs L distinct modules", ReuseConfig, plan, write_report,
                       summary, describe=describe, device=lambda c: c.train.device, extra=("routes", "train_seconds"),
                       hidden=("train.seed", "model.num_modules", "model.steps", "model.in_channels")))


def run(out_dir: str | Path, config: ReuseConfig = ReuseConfig(), progress: bool = True,
        data: TaskData | None = None) -> dict:
    """Train every planned `(method, N, L)` for every seed; write `results.json`, figures and
    `report.md` (see `plan`). `data`: the task's data itself, instead of loading `config.task`."""
    return BENCH.run(out_dir, config, progress, **({"data": data} if data is not None else {}))
