"""`isomod bench adapt`: unsupervised multi-source domain adaptation on `digits5`,
leave one domain out, and on MNIST-C style corruptions of `digits5/mnist`.

For every target domain and seed, a ModularNet is trained on the other domains (one
route and set of step norms per domain; shared stem, pool and head): for a `digits5`
target the four other domains, for an `mnistc` target all five (one model per seed
serves every corruption). The target's training images, without labels, are then given
to every method of `isomod.adapt`, in both settings (`setting`: `source_free`, or
`with_sources`, where the methods also see the sources' labelled training images); its
test images and labels score the result. Besides those methods, analysis rows that read
target labels and adapt nothing: `source_only_each` holds every source route as it is,
`adabn_each` every source route with statistics re-estimated on the target (its best is
the best source route in hindsight); both carry `source`. The route alignment methods'
rows also carry `acc_discretized`: the accuracy of their soft route's argmax (statistics
re-estimated), the cost of discretising. `route_oracle` (an analysis row too, `setting`
`target_labels`) trains the target's route alone, soft, on the target's labelled training
images for the methods' budget, from the best source route in hindsight: what re-ordering
the modules reaches from there when its signal is perfect.

The source model of each (target, seed) is kept in `OUT/sources-{left out}-s{seed}`
(`all` for the corruptions) and
reused when the command runs again; rows already in `results.json` (same configuration)
are skipped, so a stopped benchmark resumes.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from isomod import report
from isomod.data import digits5, mnistc
from isomod.bench import train_modular
from isomod.bench.base import Bench, Context, Job, Row, check_jobs, check_seeds, register
from isomod.checkpoint import load_checkpoint
from isomod.data.tasks import TaskData, load_task
from isomod.network import ModelConfig, ModularNet
from isomod.errors import check_choices
from isomod.train import TrainConfig, evaluate
from isomod.adapt import (ADAPT_METHODS, ADAPT_TRAIN, ALIGN_ROUTE_METHODS, ROUTE_METHODS, WITH_SOURCES, adapt,
                          add_as_copy, route_oracle, setting)

DOMAINS = [f"digits5/{d}" for d in digits5.DOMAINS]
CORRUPTED = [f"mnistc/{c}" for c in mnistc.CORRUPTIONS]
DEFAULT_CORRUPTIONS = ("shot_noise", "shear", "scale")  # the corruptions the authors adapted to
ANALYSIS = ("source_only_each", "adabn_each")  # rows that read target labels to analyse, one per source route
ORACLE = "route_oracle"  # analysis: the target's route trained on the target's labels
# `permutation` starts every source domain on its own order of the shared modules, so
# the sources end with different routes and choosing among them matters.
ROW_NAME = {"source_only": "source_only_best"}


@dataclass
class AdaptBenchConfig:
    """`isomod bench adapt`: leave each target out of `domains`, train on the rest, adapt
    to it with every method.

    Args:
        targets: the domains adapted to, each in turn: a domain of `domains` (the others
            are its sources) or a corruption `mnistc/*` (all of `domains` are sources);
            by default every domain and the three corruptions the authors adapted to.
        methods: a subset of the adaptation methods (`isomod adapt --help`), of either
            setting.
        seeds: one source model and one set of adaptations per seed and target.
        domains: the source domains of the benchmark.
        model: the multi-source model's shape. `permutation` starts every source domain
            on its own order of the shared modules, so the sources end with different
            routes and choosing among them matters. The stem cuts the 32x32 images into
            4x4 patches (8x8 feature maps): a quarter of the compute of a stride-2 stem,
            which a bench of 3 seeds and 8 targets on 2 CPU cores needs.
        jobs: source models, then adaptations, side by side, each in its own process with
            an equal share of the threads.
        source: the supervised multi-source training budget.
        adapt: the budget of every adaptation method that trains.
    """

    targets: list[str] = field(default_factory=lambda: DOMAINS + [f"mnistc/{c}" for c in DEFAULT_CORRUPTIONS])
    methods: list[str] = field(default_factory=lambda: list(ADAPT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    jobs: int = 1
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        in_channels=3, channels=32, num_modules=8, steps=8, stem_stride=4, route_init="permutation"))
    source: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=800, batch_size=128, lr=5e-3, lr_heads=5e-3, checkpoint_every=400, log_every=25))
    adapt: TrainConfig = field(default_factory=lambda: replace(ADAPT_TRAIN, steps=200))

    def __post_init__(self):
        check_choices("adaptation method", self.methods, ADAPT_METHODS)
        check_choices("target", self.targets, self.domains + CORRUPTED)
        check_seeds(self.seeds)
        check_jobs(self.jobs)


def short(task: str) -> str:
    return task.rsplit("/", 1)[-1]


def left_out(target: str, domains: list[str]) -> str:
    """Name of the source model a target adapts from: the domain it leaves out, or `all`."""
    return short(target) if target in domains else "all"


def group(task: str) -> str:
    """`digits5` or `mnistc`: the family a target belongs to (results are averaged per family)."""
    return task.split("/", 1)[0]


@functools.lru_cache(maxsize=None)
def domain_data(name: str) -> TaskData:
    """A domain's data, read once per process."""
    return load_task(name)


def source_dir(out: Path, target: str, domains: list[str], seed: int) -> Path:
    return out / f"sources-{left_out(target, domains)}-s{seed}"


def plan(ctx: Context):
    """Three stages: the source models (one per left-out domain and seed, reloaded when
    complete); then every analysis row and method on every target; then `route_oracle`,
    which starts from the best source route in hindsight (an analysis row of stage two).
    Rows already in the results are not planned again."""
    config, results = ctx.config, ctx.results
    pairs = [(seed, target, [d for d in config.domains if d != target]) for seed in config.seeds
             for target in config.targets]
    models = {}
    for seed, target, sources in pairs:
        models.setdefault(source_dir(ctx.out, target, config.domains, seed), (sources, seed))

    def record_sources(results, output, run_dir: Path) -> None:
        accs, seconds, routes = output
        # The first run's training time stays: a rerun only reloads the checkpoint.
        results["source_models"].setdefault(run_dir.name.removeprefix("sources-"), {"test_acc": accs,
                                                                                    "seconds": seconds})
        for seed, target, sources in pairs:
            if source_dir(ctx.out, target, config.domains, seed) == run_dir:
                results["routes"].setdefault(f"{short(target)}-s{seed}", {})["sources"] = routes

    yield [Job(train_sources, (run_dir, sources, config.model, config.source, seed, ctx.progress),
               lambda results, out, run_dir=run_dir: record_sources(results, out, run_dir))
           for run_dir, (sources, seed) in models.items()]
    jobs = []
    for seed, target, sources in pairs:
        run_dir = source_dir(ctx.out, target, config.domains, seed)
        jobs += [Job(analysis_rows, (run_dir, target, s, seed), lambda results, rows: results.add(*rows))
                 for s in sources if not results.has(method=ANALYSIS[0], task=target, seed=seed, source=s)]
        jobs += [Job(method_run, (run_dir, target, sources, method, replace(config.adapt, seed=seed), ctx.progress),
                     lambda results, out: record_method(ctx, out))
                 for method in config.methods
                 if not results.has(method=ROW_NAME.get(method, method), task=target, seed=seed, source=None)]
    yield jobs
    yield [Job(oracle_run, (source_dir(ctx.out, target, config.domains, seed), target, sources,
                            best_source(results.rows, target, seed), replace(config.adapt, seed=seed), ctx.progress),
               lambda results, out: record_oracle(results, out))
           for seed, target, sources in pairs if not results.has(method=ORACLE, task=target, seed=seed)]


def train_sources(run_dir: Path, sources: list[str], model_config: ModelConfig, train_config: TrainConfig,
                  seed: int, progress: bool) -> tuple[dict[str, float], float, dict[str, list[int]]]:
    """Train (or reload) one multi-source model; its test accuracy per source, seconds and routes."""
    if progress:
        print(f"== sources {', '.join(map(short, sources))} (seed {seed})", flush=True)
    t0 = time.time()
    base, accs = train_modular(run_dir, [domain_data(s) for s in sources], model_config, train_config, seed, progress)
    return accs, round(time.time() - t0, 1), {s: base.route(s).indices() for s in sources}


def load_sources(run_dir: Path) -> ModularNet:
    return load_checkpoint(run_dir / "checkpoint").eval()


def analysis_rows(run_dir: Path, target: str, source: str, seed: int) -> list[Row]:
    """`source_only_each` and `adabn_each` of one source route on one target."""
    base, tgt = load_sources(run_dir), domain_data(target)
    rows = []
    for name in ANALYSIS:
        model = copy.deepcopy(base)
        add_as_copy(model, tgt.spec, source)
        if name == "adabn_each":
            model.estimate_stats(target, tgt.x_train)
        acc = evaluate(model, {target: tgt})[target]
        rows.append(_row(name, target, acc, model.param_count(), 0, seed, source=source))
    return rows


def method_run(run_dir: Path, target: str, sources: list[str], method: str, config: TrainConfig,
               progress: bool) -> tuple[Row, dict | None, float]:
    """One adaptation method on one target: its row, its route (route methods) and seconds."""
    name, tgt = ROW_NAME.get(method, method), domain_data(target)
    if progress:
        print(f"== {name} -> {short(target)} (seed {config.seed})", flush=True)
    t0 = time.time()
    model = load_sources(run_dir)
    res = adapt(model, tgt, method, config, progress=progress, sources={s: domain_data(s) for s in sources})
    acc = evaluate(model, {target: tgt})[target]  # the only place target labels are read
    seconds = round(time.time() - t0, 1)
    extra, route = {}, None
    if method in ALIGN_ROUTE_METHODS:  # what discretising the soft route would cost
        extra["acc_discretized"], discrete = discretized(model, tgt)
        route = {"discrete": discrete, "soft": res.soft_route}
    if res.history:
        extra["align_first"], extra["align_last"] = res.history[0]["align"], res.history[-1]["align"]
    if method in ROUTE_METHODS:
        route = {"discrete": model.route(target).indices(), "soft_at_discretize": res.soft_route, "kept": res.kept}
    row = _row(name, target, acc, model.param_count(), res.params_task, config.seed, chosen=res.source,
               score=res.score, scores=res.scores, **extra)
    return row, route, seconds


def record_method(ctx: Context, output: tuple[Row, dict | None, float]) -> None:
    row, route, seconds = output
    key = f"{short(row.task)}-s{row.fields['seed']}"
    ctx.results["seconds"][f"{row.method}/{key}"] = seconds
    ctx.results.add(row)
    if route is not None:
        ctx.results["routes"].setdefault(key, {})[row.method] = route


def best_source(rows: list[dict], target: str, seed: int) -> str:
    return next(r["source"] for r in hindsight_rows(rows) if r["task"] == target and r["seed"] == seed)


def oracle_run(run_dir: Path, target: str, sources: list[str], start: str, config: TrainConfig,
               progress: bool) -> tuple[Row, dict]:
    if progress:
        print(f"== {ORACLE} -> {short(target)} (seed {config.seed}, from {short(start)})", flush=True)
    return oracle_row(load_sources(run_dir), domain_data(target), sources, start, config, progress)


def record_oracle(results, output: tuple[Row, dict]) -> None:
    row, route = output
    results.add(row)
    results["routes"].setdefault(f"{short(row.task)}-s{row.fields['seed']}", {})[ORACLE] = route


def oracle_row(base: ModularNet, target: TaskData, sources: list[str], start: str, config: TrainConfig,
               progress: bool) -> tuple[Row, dict]:
    """`route_oracle`'s result row (test accuracy soft and discretised, the training loss
    over the first and last fifth) and its route."""
    model, trainer, changed = route_oracle(base, target, sources, start, config, progress)
    name = target.spec.name
    acc_discretized, discrete = discretized(model, target)
    losses = [h["loss"] for h in trainer.history]
    fifth = max(1, len(losses) // 5)
    row = _row(ORACLE, name, evaluate(model, {name: target})[name], model.param_count(), changed, config.seed,
               chosen=start, acc_discretized=acc_discretized, loss_first_fifth=round(float(np.mean(losses[:fifth])), 5),
               loss_last_fifth=round(float(np.mean(losses[-fifth:])), 5))
    return row, {"discrete": discrete, "soft": model.route(name).weights().detach().cpu().tolist()}


def discretized(model: ModularNet, target: TaskData) -> tuple[float, list[int]]:
    """Test accuracy (rounded) of a copy of `model` whose soft route for `target` is frozen to
    its argmax, statistics re-estimated on the target images; and that route."""
    name = target.spec.name
    hard = copy.deepcopy(model)
    hard.discretize(name)
    hard.estimate_stats(name, target.x_train)
    return round(evaluate(hard, {name: target})[name], 5), hard.route(name).indices()


def _row(method: str, task: str, acc: float, params_total: int, params_task: int, seed: int, **extra) -> Row:
    # The analysis rows (one fixed source route, with or without target statistics) and
    # `source_only_best` read the target's images at most: source-free.
    # `route_oracle` reads the target's labels to train.
    mode = setting(method) if method in ADAPT_METHODS else "target_labels" if method == ORACLE else "source_free"
    return Row(method, task, "test_acc", round(acc, 5), {"setting": mode, "params_total": params_total,
                                                         "params_task": params_task, "seed": seed, **extra})


FAMILIES = {"digits5": "digits5 targets (leave one domain out)", "mnistc": "MNIST-C style targets (sources: all five "
             "digits5 domains)"}


def hindsight_rows(rows: list[dict]) -> list[dict]:
    """Rows of `best_source_hindsight`: per target and seed, the best `adabn_each` route
    (chosen with the target's labels: an upper bound for choosing one source route)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] == "adabn_each":
            k = (r["task"], r["seed"])
            if k not in best or r["value"] > best[k]["value"]:
                best[k] = {**r, "method": "best_source_hindsight"}
    return list(best.values())


def family_rows(results: dict, family: str) -> list[dict]:
    """The family's method rows, plus `best_source_hindsight`; the per-source rows left out."""
    rows = [r for r in results["rows"] if group(r["task"]) == family]
    return [r for r in rows if r["method"] not in ANALYSIS] + hindsight_rows(rows)


def means(rows: list[dict]) -> dict[str, float]:
    """Mean test accuracy over targets (each the mean over seeds) per method."""
    table = report.mean_table(rows)
    return {m: per["mean"] for m, per in table.items()}


def findings(rows: list[dict]) -> list[str]:
    """Per setting, the best route method against the baselines, on the mean over targets."""
    s = means(rows)
    lines = []
    for title, candidates, refs in (
            ("source-free", ("route_select", "route_entropy", "route_im"), ("source_only_best", "adabn", "tent")),
            ("with sources", ALIGN_ROUTE_METHODS, ("adabn", "tent", "m3sda", "dann"))):
        route = {m: s[m] for m in candidates if m in s}
        if not route:
            continue
        best = max(route, key=route.get)
        r = route[best]
        changed = [x for x in rows if x["method"] == best]
        share = 100 * np.mean([x["params_task"] / x["params_total"] for x in changed])
        lines.append(f"- {title}: best route method {best}, mean {100 * r:.1f} (changes {share:.2f}% of the "
                     "model's numbers)")
        lines += [f"  - vs {m} {100 * s[m]:.1f}: {100 * (r - s[m]):+.1f} points" for m in refs if m in s]
    if "best_source_hindsight" in s:
        lines.append(f"- the best single source route with target statistics, chosen with target labels: "
                     f"{100 * s['best_source_hindsight']:.1f}")
    if ORACLE in s:
        hard = 100 * np.mean([r["acc_discretized"] for r in rows if r["method"] == ORACLE])
        lines.append(f"- the target's route trained on the target's labels from that route ({ORACLE}, analysis: "
                     f"re-ordering with a perfect signal at the methods' budget): {100 * s[ORACLE]:.1f} soft, {hard:.1f} "
                     "discretised (mean over runs)")
    return lines


def start_gains(rows: list[dict]) -> dict[str, float]:
    """Per method with sources, the mean change (points) against its own start: the
    chosen source's route with statistics re-estimated on the target (`adabn_each`)."""
    start = {(r["task"], r["seed"], r["source"]): r["value"] for r in rows if r["method"] == "adabn_each"}
    gains: dict[str, list[float]] = {}
    for r in rows:
        key = (r["task"], r["seed"], r.get("chosen"))
        if r["method"] in WITH_SOURCES and key in start:
            gains.setdefault(r["method"], []).append(100 * (r["value"] - start[key]))
    return {m: float(np.mean(v)) for m, v in gains.items()}


def summary(results: dict) -> str:
    parts = []
    for family, title in FAMILIES.items():
        rows = family_rows(results, family)
        if rows:
            parts += [f"### {title}", "", report.markdown_results(rows), "", *findings(rows)]
            gains = start_gains([r for r in results["rows"] if group(r["task"]) == family])
            if gains:
                parts.append("- with sources, against each run's start (the nearest source's route with target "
                             "statistics): " + ", ".join(f"{m} {v:+.1f}" for m, v in gains.items()) + " points")
            parts.append("")
    return "\n".join(parts).rstrip()


def per_source_table(results: dict) -> str:
    """Target x source route accuracy (mean over seeds) as trained / with target
    statistics, with what each method chose."""
    rows = results["rows"]
    targets = list(dict.fromkeys(r["task"] for r in rows))
    used = {r["source"] for r in rows if r["method"] in ANALYSIS}
    sources = [d for d in results["config"]["domains"] if d in used]
    lines = ["| target | " + " | ".join(short(s) for s in sources) + " | chosen by IM (source_only) | chosen by "
             "statistics (route_select) | chosen by feature gap (with sources) |",
             "|---|" + "---:|" * len(sources) + "---|---|---|"]
    for t in targets:
        cells = []
        for s in sources:
            vals = []
            for m in ANALYSIS:
                v = [r["value"] for r in rows if r["method"] == m and r["task"] == t and r["source"] == s]
                vals.append(f"{100 * np.mean(v):.1f}" if v else "-")
            cells.append(" / ".join(vals))
        chosen = []
        for m in ("source_only_best", "route_select", "route_moment"):
            picks = [short(r["chosen"]) for r in sorted((r for r in rows if r["method"] == m and r["task"] == t),
                                                        key=lambda r: r["seed"])]
            chosen.append(" / ".join(picks) or "-")
        lines.append(f"| {short(t)} | " + " | ".join(cells + chosen) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: dict) -> Path:
    """Draw the figures and write `report.md` from `results`."""
    cfg = results["config"]
    rows = results["rows"]
    parts = ["# isomod bench adapt", "",
             "Unsupervised multi-source domain adaptation on `digits5`, leave one domain out, and on MNIST-C style "
             f"corruptions of `digits5/mnist`: a modular network ({cfg['model']['num_modules']} modules, "
             f"{cfg['model']['steps']} steps, {cfg['model']['channels']} channels) is trained on the source domains "
             f"({cfg['source']['steps']} steps), then each method adapts it to the target from the target's "
             f"unlabelled training images ({cfg['adapt']['steps']} steps for the methods that train); the "
             "`with_sources` methods also see the sources' labelled training images. Only `m3sda` and `dann` change "
             "pool, stem, head and sources. Test accuracy (%) on the target's test images, mean over seeds "
             f"{cfg['seeds']}; `best_source_hindsight`: the best source route with statistics re-estimated on the "
             "target, chosen with the target's labels (analysis only); params per task = numbers the adaptation "
             "changed.", "", summary(results), ""]
    kept = {m: [r[m]["kept"] for r in results.get("routes", {}).values() if r.get(m, {}).get("kept") is not None]
            for m in ("route_entropy", "route_im")}
    kept = {m: v for m, v in kept.items() if v}
    if kept:
        parts += ["Learned routes kept (their IM score beat the starting source route's; otherwise it was restored): "
                  + ", ".join(f"{m} {sum(v)} of {len(v)}" for m, v in kept.items()) + ".", ""]
    parts += ["## Each source route on each target", "",
              "Accuracy of every source route on each target (mean over seeds), as trained / with statistics "
              "re-estimated on the target images, and the source each unsupervised choice picked (per seed).", "",
              per_source_table(results), ""]
    if rows:
        report.plot_task_accuracy(rows, out / "accuracy.png")
        parts += ["![accuracy per target](accuracy.png)", ""]
    parts += routes_section(out, results)
    shown = list(dict.fromkeys(cfg["domains"] + cfg["targets"]))
    plot_samples({short(d): load_task(d).x_test[:12].numpy() for d in shown}, out / "samples.png")
    parts += ["## Samples", "", "Test images of each domain.", "", "![samples](samples.png)", ""]
    models = results.get("source_models", {})
    if models:
        parts += ["## Source models", "", "| domain left out, seed | source test accuracy | seconds |", "|---|---|---:|"]
        parts += [f"| {k} | " + ", ".join(f"{short(t)} {100 * a:.1f}" for t, a in v["test_acc"].items())
                  + f" | {v['seconds']} |" for k, v in models.items()]
        parts.append("")
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def routes_section(out: Path, results: dict) -> list[str]:
    """The first seed's source routes and learned target routes, drawn, with their heading."""
    cfg = results["config"]
    first = min(cfg["seeds"]) if cfg["seeds"] else None
    panels, chosen = {}, {}
    n = cfg["model"]["num_modules"]
    for key, r in results.get("routes", {}).items():
        if not key.endswith(f"-s{first}"):
            continue
        target = key.rsplit("-s", 1)[0]
        for s, route in r.get("sources", {}).items():
            label = f"{target}: source {short(s)}"
            panels[label], chosen[label] = np.eye(n)[route], route
        for m in ("route_im", *ALIGN_ROUTE_METHODS):
            learned = r.get(m)
            if not learned:
                continue
            label = f"{target}: {m}" + ("" if learned.get("kept", True) else ", undone")
            panels[label] = np.asarray(learned.get("soft") or learned.get("soft_at_discretize")
                                       or np.eye(n)[learned["discrete"]])
            chosen[label] = learned["discrete"]
    if not panels:
        return []
    report.plot_usage(panels, out / "routes.png", chosen=chosen, cols=len(cfg["domains"]) + 2,
                      title="per target: the source routes, then the target's learned routes (soft weights: "
                            "route_im's before discretising, the aligned ones as kept; dots: the argmax, "
                            "route_im's start when undone)")
    return ["## Routes", "", f"Seed {first}.", "", "![routes](routes.png)", ""]


def plot_samples(images: dict[str, np.ndarray], path: Path, title: str = "samples per domain") -> Path:
    """One row of uint8 images `(n, C, H, W)` per name."""
    plt = report.pyplot()
    cols = max(len(x) for x in images.values())
    fig, axes = plt.subplots(len(images), cols, figsize=(0.8 * cols + 1.0, 0.85 * len(images)), squeeze=False)
    for row, (name, x) in zip(axes, images.items()):
        for ax in row:
            ax.axis("off")
        for ax, img in zip(row, x):
            img = np.asarray(img).transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        row[0].text(-0.1, 0.5, name, transform=row[0].transAxes, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return report.save_figure(fig, path, tight=False)


BENCH = register(Bench("adapt", "unsupervised multi-source domain adaptation on digits5 (leave one domain out) and "
                       "MNIST-C style targets: route methods vs source-only, AdaBN and TENT (source-free), and vs "
                       "M3SDA and DANN (with sources)", AdaptBenchConfig, plan, write_report, summary,
                       unprefixed="adapt", device=lambda c: c.source.device,
                       extra=("source_models", "routes", "seconds")))
run = BENCH.run
