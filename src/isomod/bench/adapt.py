"""`isomod bench adapt`: unsupervised multi-source domain adaptation on `digits5`,
leave one domain out.

For every target domain and seed, a ModularNet is trained on the four other domains (one
route and set of step norms per domain; shared stem, pool and head). The target's
training images, without labels, are then given to every method of `isomod.adapt`; its
test images and labels score the result. Besides those methods, `source_only_each`
rows hold every source route as it is (rows carry `source`).

The source model of each (target, seed) is kept in `OUT/sources-{target}-s{seed}` and
reused when the command runs again; rows already in `results.json` (same configuration)
are skipped, so a stopped benchmark resumes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from isomod import report
from isomod.data import digits5
from isomod.bench import train_modular
from isomod.bench.base import Bench, Results, check_seeds, environment, register
from isomod.data.tasks import load_task
from isomod.network import ModelConfig
from isomod.errors import check_choices, check_out_dir
from isomod.train import TrainConfig, evaluate, resolve_device
from isomod.adapt import ADAPT_METHODS, ADAPT_TRAIN, ROUTE_METHODS, adapt, add_as_copy

DOMAINS = [f"digits5/{d}" for d in digits5.DOMAINS]
# `permutation` starts every source domain on its own order of the shared modules, so
# the sources end with different routes and choosing among them matters.
ROW_NAME = {"source_only": "source_only_best"}


@dataclass
class AdaptBenchConfig:
    """`isomod bench adapt`: leave each target out of `domains`, train on the rest, adapt
    to it with every method.

    Args:
        targets: the domains adapted to, each in turn (the others are its sources).
        methods: a subset of the adaptation methods (`isomod adapt --help`).
        seeds: one source model and one set of adaptations per seed and target.
        domains: all domains of the benchmark.
        model: the multi-source model's shape. `permutation` starts every source domain
            on its own order of the shared modules, so the sources end with different
            routes and choosing among them matters.
        source: the supervised multi-source training budget.
        adapt: the budget of every adaptation method that trains.
    """

    targets: list[str] = field(default_factory=lambda: list(DOMAINS))
    methods: list[str] = field(default_factory=lambda: list(ADAPT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        in_channels=3, channels=32, num_modules=8, steps=8, route_init="permutation"))
    source: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=800, batch_size=128, lr=5e-3, lr_heads=5e-3, checkpoint_every=400, log_every=25))
    adapt: TrainConfig = field(default_factory=lambda: replace(ADAPT_TRAIN, steps=200))

    def __post_init__(self):
        check_choices("adaptation method", self.methods, ADAPT_METHODS)
        check_choices("target", self.targets, self.domains)
        check_seeds(self.seeds)


def short(task: str) -> str:
    return task.rsplit("/", 1)[-1]


def run(out_dir: str | Path, config: AdaptBenchConfig = AdaptBenchConfig(), progress: bool = True) -> dict:
    """Leave each target out, train on the rest, adapt to it with every method; write
    `results.json` (row by row: a second run of the same configuration skips the rows it
    has), figures and `report.md`."""
    out = Path(out_dir)
    check_out_dir(out)
    results = Results(out / "results.json", "adapt", asdict(config), resume=True, source_models={}, routes={},
                      seconds={}, environment=environment(resolve_device(config.source.device)))
    data = {d: load_task(d) for d in config.domains}
    for seed in config.seeds:
        for target in config.targets:
            sources = [d for d in config.domains if d != target]
            key = f"{short(target)}-s{seed}"
            if progress:
                print(f"== sources {', '.join(map(short, sources))} -> target {short(target)} (seed {seed})", flush=True)
            t0 = time.time()
            base, accs = train_modular(out / f"sources-{key}", [data[s] for s in sources], config.model,
                                       config.source, seed, progress)
            base.eval()
            routes = results["routes"].setdefault(key, {})
            routes["sources"] = {s: base.route(s).indices() for s in sources}
            # The first run's training time stays: a rerun only reloads the checkpoint.
            results["source_models"].setdefault(key, {"test_acc": accs, "seconds": round(time.time() - t0, 1)})
            tgt = data[target]
            for s in sources:
                if results.has(method="source_only_each", task=target, seed=seed, source=s):
                    continue
                model = copy.deepcopy(base)
                add_as_copy(model, tgt.spec, s)
                acc = evaluate(model, {target: tgt})[target]
                results.add(_row("source_only_each", target, acc, model.param_count(), 0, seed, source=s))
            for method in config.methods:
                name = ROW_NAME.get(method, method)
                if results.has(method=name, task=target, seed=seed, source=None):
                    continue
                if progress:
                    print(f"== {name} -> {short(target)} (seed {seed})", flush=True)
                t0 = time.time()
                model = copy.deepcopy(base)
                res = adapt(model, tgt, method, replace(config.adapt, seed=seed), progress=progress)
                acc = evaluate(model, {target: tgt})[target]  # the only place target labels are read
                results["seconds"][f"{name}/{key}"] = round(time.time() - t0, 1)
                results.add(_row(name, target, acc, model.param_count(), res.params_task, seed,
                                 chosen=res.source, score=res.score, scores=res.scores))
                if method in ROUTE_METHODS:
                    routes[name] = {"discrete": model.route(target).indices(), "soft_at_discretize": res.soft_route,
                                    "kept": res.kept}
                results.save()
            results.save()
    results.save()
    write_report(out, results.data)
    return results.data


def _row(method: str, task: str, acc: float, params_total: int, params_task: int, seed: int, **extra) -> dict:
    return {"method": method, "task": task, "metric": "test_acc", "value": round(acc, 5),
            "params_total": params_total, "params_task": params_task, "seed": seed, **extra}


def means(results: dict) -> dict[str, float]:
    """Mean test accuracy over targets (each the mean over seeds) per method."""
    table = report.mean_table(results["rows"])
    return {m: per["mean"] for m, per in table.items()}


def findings(results: dict) -> list[str]:
    """The best route method against source-only, TENT and AdaBN, on the mean over targets."""
    s = means(results)
    route = {m: v for m, v in s.items() if m.startswith("route_")}
    if not route or "source_only_best" not in s:
        return []
    best = max(route, key=route.get)
    r = route[best]
    lines = [f"- best route method: {best}, mean {100 * r:.1f}"]
    for m in ("source_only_best", "tent", "adabn"):
        if m in s:
            lines.append(f"- vs {m} {100 * s[m]:.1f}: {100 * (r - s[m]):+.1f} points")
    return lines


def summary(results: dict) -> str:
    return "\n".join([report.markdown_results(results["rows"]), *findings(results)])


def per_source_table(results: dict) -> str:
    """Target x source route accuracy (mean over seeds), with what each method chose."""
    rows = results["rows"]
    targets = list(dict.fromkeys(r["task"] for r in rows))
    used = {r["source"] for r in rows if r["method"] == "source_only_each"}
    sources = [d for d in results["config"]["domains"] if d in used]
    lines = ["| target | " + " | ".join(short(s) for s in sources) + " | chosen by IM (source_only) | chosen by "
             "statistics (route_select) |", "|---|" + "---:|" * len(sources) + "---|---|"]
    for t in targets:
        cells = []
        for s in sources:
            v = [r["value"] for r in rows if r["method"] == "source_only_each" and r["task"] == t and r["source"] == s]
            cells.append(f"{100 * np.mean(v):.1f}" if v else "-")
        chosen = []
        for m in ("source_only_best", "route_select"):
            picks = [short(r["chosen"]) for r in sorted((r for r in rows if r["method"] == m and r["task"] == t),
                                                        key=lambda r: r["seed"])]
            chosen.append(" / ".join(picks) or "-")
        lines.append(f"| {short(t)} | " + " | ".join(cells) + f" | {chosen[0]} | {chosen[1]} |")
    return "\n".join(lines)


def write_report(out: Path, results: dict) -> Path:
    """Draw the figures and write `report.md` from `results`."""
    cfg = results["config"]
    rows = results["rows"]
    parts = ["# isomod bench adapt", "",
             "Unsupervised multi-source domain adaptation on `digits5`, leave one domain out: a modular network "
             f"({cfg['model']['num_modules']} modules, {cfg['model']['steps']} steps, {cfg['model']['channels']} "
             f"channels) is trained on the four other domains ({cfg['source']['steps']} steps), then each method "
             f"adapts it to the target from the target's unlabelled training images ({cfg['adapt']['steps']} steps "
             "for the methods that train). Pool, stem and the shared head never change. Test accuracy (%) on the "
             f"target's test images, mean over seeds {cfg['seeds']}; `source_only_each` is the mean over the four "
             "source routes; params per task = numbers the target changed (route logits, norm parameters, norm "
             "statistics).", "", report.markdown_results(rows), ""]
    lines = findings(results)
    if lines:
        parts += ["Mean over targets:", "", *lines, ""]
    kept = {m: [r[m]["kept"] for r in results.get("routes", {}).values() if r.get(m, {}).get("kept") is not None]
            for m in ("route_entropy", "route_im")}
    kept = {m: v for m, v in kept.items() if v}
    if kept:
        parts += ["Learned routes kept (their IM score beat the starting source route's; otherwise it was restored): "
                  + ", ".join(f"{m} {sum(v)} of {len(v)}" for m, v in kept.items()) + ".", ""]
    parts += ["## Each source route on each target", "",
              "Accuracy of every source route, as trained, on each target (mean over seeds), and the source each "
              "unsupervised choice picked (per seed).", "", per_source_table(results), ""]
    if rows:
        report.plot_task_accuracy(rows, out / "accuracy.png")
        parts += ["![accuracy per target](accuracy.png)", ""]
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
        learned = r.get("route_im") or next((r[m] for m in r if m.startswith("route_")), None)
        if learned:
            label = f"{target}: target, " + ("learned route kept" if learned.get("kept", True) else "learned route undone")
            panels[label] = np.asarray(learned["soft_at_discretize"] or np.eye(n)[learned["discrete"]])
            chosen[label] = learned["discrete"]
    if panels:
        report.plot_usage(panels, out / "routes.png", chosen=chosen, cols=5,
                          title="per target: the four source routes and the target's route_im route (soft weights "
                                "before discretising; dots: the final route, the starting one when undone)")
        parts += ["## Routes", "", f"Seed {first}.", "", "![routes](routes.png)", ""]
    plot_samples({short(d): digits5.generate(short(d))["x_test"][:12] for d in cfg["domains"]},
                        out / "samples.png")
    parts += ["## digits5 samples", "", "Test images of each domain.", "", "![samples](samples.png)", ""]
    models = results.get("source_models", {})
    if models:
        parts += ["## Source models", "", "| target left out, seed | source test accuracy | seconds |", "|---|---|---:|"]
        parts += [f"| {k} | " + ", ".join(f"{short(t)} {100 * a:.1f}" for t, a in v["test_acc"].items())
                  + f" | {v['seconds']} |" for k, v in models.items()]
        parts.append("")
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


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


register(Bench("adapt", "unsupervised multi-source domain adaptation on digits5, leave one domain out: route "
               "methods vs source-only, AdaBN and TENT", AdaptBenchConfig, run, write_report, summary,
               unprefixed="adapt"))
