"""The report of `isomod bench adapt`: its tables, findings and figures, from `results.json`.

Rows carry `setting` (`source_free`, `with_sources`, `few_labels` with `shots`, or the
analysis rows' `target_labels`), `regime` (the source models' route regime; absent in
files from before regimes) and, where the sources kept training while the target's route
aligned, `sources_train: true` (shown as `METHOD+sources`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isomod.bench import report
from isomod.bench.docs import md_table
from isomod.methods.adapt import ADAPT
from isomod.bench.paired import INTERVAL, pair
from isomod.data.tasks import load_task
from isomod.training.regimes import REGIMES
from isomod.files import write_text_atomic

ANALYSIS = ("source_only_each", "adabn_each")  # rows that read target labels to analyse, one per source route
ORACLE = "route_oracle"  # analysis: the target's route trained on the target's labels
CONFIGURED = "configured"  # not a regime of isomod.training.regimes: the bench's own model and source configs
# the few-label methods, then the baselines they are measured against (their common start)
FEW_LABEL_METHODS = tuple(dict.fromkeys(ADAPT.names("few_labels") + ADAPT.baselines("few_labels")))
ROUTE_ALONE = ADAPT.where(lambda m: m.setting == "few_labels" and m.route_alone)  # route and statistics, nothing else
UNLABELLED_BASELINES = tuple(ADAPT[m].row for m in ADAPT.where(lambda m: {"source_free", "with_sources"}
                                                                & set(m.baseline_for)))
COMMON_START = next(m.name for m in ADAPT if {"source_free", "few_labels"} <= set(m.baseline_for))


def short(task: str) -> str:
    return task.rsplit("/", 1)[-1]


def group(task: str) -> str:
    """`digits5` or `mnistc`: the family a target belongs to (results are averaged per family)."""
    return task.split("/", 1)[0]


def regimes_of(results: dict) -> list[str]:
    return list(results["config"].get("regimes") or [CONFIGURED])


def regime_view(results: dict, regime: str) -> dict:
    """The rows of one regime's source models (rows without a regime: the default's), with
    the display names of rows whose sources kept training."""
    rows = [{**r, "method": f"{r['method']}+sources"} if r.get("sources_train") else r
            for r in results["rows"] if r.get("regime", CONFIGURED) == regime]
    routes = results.get("routes", {})
    routes = routes.get(regime, {}) if "regimes" in results["config"] else routes
    return {**results, "rows": rows, "routes": routes}


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
    """The family's unsupervised method rows, plus `best_source_hindsight`; the per-source
    and the few-label rows left out."""
    rows = [r for r in results["rows"] if group(r["task"]) == family and r.get("setting") != "few_labels"]
    return [r for r in rows if r["method"] not in ANALYSIS] + hindsight_rows(rows)


def means(rows: list[dict]) -> dict[str, float]:
    """Mean test accuracy over targets (each the mean over seeds) per method."""
    table = report.mean_table(rows)
    return {m: per["mean"] for m, per in table.items()}


def reported(results: dict) -> dict:
    """`results` without the selection rows (runs on the development target, never reported)."""
    return {**results, "rows": [r for r in results["rows"] if not r.get("selection")]}


def route_value(form: str):
    """How a route row's accuracy is read as a soft route (`acc_soft`) or a discrete one
    (`acc_discretized`); a row of a method that returns no route reads its `value` either way."""
    field = "acc_soft" if form == "soft" else "acc_discretized"
    return lambda r: r.get(field) if "route_form" in r else r["value"]


def comparison_table(rows: list[dict], pairs: list[tuple[str, str]], unit: tuple[str, ...] = ("task", "seed")
                     ) -> list[str]:
    """A markdown table of paired differences (points) of each (method, comparator), the
    method's route read soft and discretised."""
    body = []
    for m, ref in pairs:
        mine, theirs = [r for r in rows if r["method"] == m], [r for r in rows if r["method"] == ref]
        if not mine or not theirs:
            continue
        forms = ("soft", "discrete") if any("route_form" in r for r in mine) else ("-",)
        for form in forms:
            p = pair(mine, theirs, unit, route_value(form), route_value("soft"))
            if p.n:
                lo, hi = p.interval
                body.append([m, form, ref, f"{p.mean:+.1f} [{lo:+.1f}, {hi:+.1f}]", p.n])
    return md_table(["method", "route form", "against", f"mean difference, {INTERVAL}", "units"], body, "llllr") if body else []


def findings(rows: list[dict]) -> list[str]:
    """Each route method against the baselines of its setting, paired on (target, seed),
    its route soft and discretised; no method is singled out by its test accuracy."""
    s = means(rows)
    names = {r["method"] for r in rows}
    routes = [m for m in names if m.removesuffix("+sources") in ADAPT and ADAPT[m.removesuffix("+sources")].routes]
    refs = [m for m in UNLABELLED_BASELINES if m in names]
    order = {m: i for i, m in enumerate(ADAPT.names())}
    routes.sort(key=lambda m: (m.endswith("+sources"), order[m.removesuffix("+sources")]))
    lines = comparison_table(rows, [(m, ref) for m in routes for ref in refs])
    if lines:
        lines = ["Paired differences (points) on (target, seed):", "", *lines, ""]
    if "best_source_hindsight" in s:
        lines.append(f"- the best single source route with target statistics, chosen with target labels: "
                     f"{100 * s['best_source_hindsight']:.1f}")
    if ORACLE in s:
        hard = 100 * np.mean([r["acc_discretized"] for r in rows if r["method"] == ORACLE])
        lines.append(f"- the target's route trained on the target's labels from that route ({ORACLE}, analysis: "
                     f"re-ordering with a perfect signal at the methods' budget): {100 * s[ORACLE]:.1f} soft, {hard:.1f} "
                     "discretised (mean over runs)")
    return lines


# The methods with sources that start from the nearest source's route (route_calibrated
# chooses among routes and recombinations instead: it has no start of that kind).
FROM_NEAREST = ADAPT.where(lambda m: m.setting == "with_sources" and not m.sets_route)


def start_gains(rows: list[dict]) -> dict[str, float]:
    """Per method with sources that starts from the nearest source, the mean change (points)
    against that start: its route with statistics re-estimated on the target (`adabn_each`)."""
    start = {(r["task"], r["seed"], r["source"]): r["value"] for r in rows if r["method"] == "adabn_each"}
    gains: dict[str, list[float]] = {}
    for r in rows:
        key = (r["task"], r["seed"], r.get("chosen"))
        if r["method"].removesuffix("+sources") in FROM_NEAREST and key in start:
            gains.setdefault(r["method"], []).append(100 * (r["value"] - start[key]))
    return {m: float(np.mean(v)) for m, v in gains.items()}


def unsupervised_summary(results: dict) -> list[str]:
    parts = []
    for family, title in FAMILIES.items():
        rows = family_rows(results, family)
        if rows:
            parts += [f"### {title}", "", report.markdown_results(rows), "", *route_forms(rows), *findings(rows)]
            gains = start_gains([r for r in results["rows"] if group(r["task"]) == family])
            if gains:
                parts.append("- with sources, against each run's start (the nearest source's route with target "
                             "statistics): " + ", ".join(f"{m} {v:+.1f}" for m, v in gains.items()) + " points")
            parts.append("")
    return parts


def route_forms(rows: list[dict]) -> list[str]:
    """Each route method's accuracy (%) read soft and discretised (one module per step,
    statistics re-estimated), mean over its rows; `value` above is whichever it ended as."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if any("route_form" in r for r in rows
                                                                           if r["method"] == m)]
    if not methods:
        return []
    body = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m and "route_form" in r]
        soft = [r["acc_soft"] for r in mine if "acc_soft" in r]
        hard = [r["acc_discretized"] for r in mine]
        ended = "/".join(sorted({r["route_form"] for r in mine}))
        body.append([m, ended, f"{100 * np.mean(soft):.1f}" if soft else "", f"{100 * np.mean(hard):.1f}", len(mine)])
    return md_table(["route method", "ended as", "soft", "discretised", "runs"], body, "llrrr") + [""]


def few_label_means(rows: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """(method, shots) -> target -> mean accuracy over seeds, and `mean` over targets."""
    acc: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in rows:
        if r.get("setting") == "few_labels":
            acc.setdefault((r["method"], r["shots"]), {}).setdefault(r["task"], []).append(r["value"])
    out = {}
    for key, per in acc.items():
        out[key] = {t: float(np.mean(v)) for t, v in per.items()}
        out[key]["mean"] = float(np.mean(list(out[key].values())))
    return out


def few_label_table(rows: list[dict]) -> list[str]:
    """Targets as rows, methods as columns, one table per shot count; then the checks of
    the route-only methods against AdaBN and the norm patch."""
    table = few_label_means(rows)
    if not table:
        return []
    methods = [m for m in FEW_LABEL_METHODS if any(k[0] == m for k in table)]
    parts = ["### A few labelled target images per class (`few_labels`)", "",
             "Test accuracy (%), mean over seeds; every method starts where AdaBN ends and gets the same labelled "
             "images and budget.", ""]
    for shots in sorted({k[1] for k in table}):
        tasks = sorted({t for (m, k), per in table.items() if k == shots for t in per if t != "mean"})
        body = [["**mean**" if t == "mean" else t,
                 *(f"{100 * table[(m, shots)][t]:.1f}" if t in table.get((m, shots), {}) else "" for m in methods)]
                for t in tasks + ["mean"]]
        parts += [f"{shots} labelled image{'s' if shots > 1 else ''} per class:", "",
                  *md_table(["target", *methods], body, "l" + "r" * len(methods))]
        parts.append("")
        at = [r for r in rows if r.get("setting") == "few_labels" and r["shots"] == shots]
        parts += route_forms(at)
        pairs = [(m, ref) for m in ROUTE_ALONE for ref in ADAPT.baselines("few_labels") if (m, shots) in table]
        compared = comparison_table(at, pairs)
        if compared:
            parts += [f"Paired differences at {shots} a class (points) on (target, seed):", "", *compared]
        parts.append("")
    return parts


def few_label_shots(rows: list[dict], family: str = "digits5") -> int | None:
    """The largest labelled-image count per class among the family's few-label rows."""
    shots = [r["shots"] for r in rows if r.get("setting") == "few_labels" and group(r["task"]) == family]
    return max(shots) if shots else None


def numbers_rows(rows: list[dict], family: str = "digits5", shots: int | None = None) -> list[dict]:
    """Per method (unsupervised, and few-label at `shots`, by default the largest count run):
    mean accuracy over the family's targets, mean numbers changed, the gain over AdaBN of
    the same setting and per thousand numbers changed."""
    shots = few_label_shots(rows, family) if shots is None else shots
    groups: dict[tuple[str, str], dict] = {}
    for r in rows:
        if group(r["task"]) != family or r["method"] in ANALYSIS or r["method"] == ORACLE:
            continue
        few = r.get("setting") == "few_labels"
        if few and r.get("shots") != shots:
            continue
        key = ("few_labels" if few else "unlabelled", r["method"])
        g = groups.setdefault(key, {"acc": {}, "numbers": []})
        g["acc"].setdefault(r["task"], []).append(r["value"])
        g["numbers"].append(r["params_task"])
    out = []
    for (setting, method), g in groups.items():
        acc = float(np.mean([np.mean(v) for v in g["acc"].values()]))
        out.append({"setting": setting, "method": method, "acc": acc, "numbers": float(np.mean(g["numbers"]))})
    base = {o["setting"]: o["acc"] for o in out if o["method"] == COMMON_START}
    for o in out:
        ref = base.get(o["setting"], base.get("unlabelled"))
        o["gain"] = None if ref is None else o["acc"] - ref
        o["gain_per_k"] = None if ref is None or not o["numbers"] else 1000 * o["gain"] / o["numbers"]
    return sorted(out, key=lambda o: (o["setting"], o["numbers"]))


def numbers_table(rows: list[dict]) -> list[str]:
    found = numbers_rows(rows)
    if not found:
        return []
    shots = few_label_shots(rows)
    few = f"few-label methods at {shots} labelled images per class" if shots else "no few-label rows"
    lines = ["### What each adapted number buys (digits5 targets)", "",
             "Mean test accuracy over the digits5 targets against the numbers each method changes (weights and norm "
             f"statistics; mean over runs; {few}), and the gain over AdaBN of the same setting, in points and per "
             "thousand numbers.", ""]
    body = [[o["setting"], o["method"], f"{o['numbers']:,.0f}", f"{100 * o['acc']:.1f}",
             "" if o["gain"] is None else f"{100 * o['gain']:+.1f}",
             "" if o["gain_per_k"] is None else f"{100 * o['gain_per_k']:+.3f}"] for o in found]
    return lines + md_table(["setting", "method", "numbers changed", "accuracy", "gain over AdaBN",
                             "gain per 1,000 numbers"], body, "llrrrr") + [""]


def selection_section(results: dict) -> list[str]:
    """How the learning rates were chosen: the rule, and per tuned method and shot count the
    development accuracy at each factor (mean over seeds) and the factor each seed chose."""
    sel = results.get("selection") or {}
    if not sel.get("rule"):
        return ["Learning rates: the bench's defaults (this run recorded no selection rule).", ""]
    parts = [f"Selection rule: {sel['rule']}.", ""]
    dev = [r for r in results["rows"] if r.get("selection")]
    if not dev:
        return parts
    factors = sel["factors"]
    parts += [f"Development accuracy (%) on `{sel['dev_target']}`, mean over source models and seeds, at each factor "
              "of the default learning rates, and how often each factor was chosen (one choice per source model and "
              "seed):", ""]
    body = []
    for m, k in dict.fromkeys((r["method"], r.get("shots")) for r in dev):
        mine = [r for r in dev if r["method"] == m and r.get("shots") == k]
        cells = [f"{100 * np.mean([r['value'] for r in mine if r['factor'] == f]):.1f}"
                 if any(r["factor"] == f for r in mine) else "" for f in factors]
        picks = [v for key, v in sel.get("chosen", {}).items() if key.split("/")[-2] == m]
        counts = ", ".join(f"x{f:.3g} {picks.count(f)}" for f in factors if picks.count(f))
        body.append([m, "-" if k is None else k, *cells, counts])
    return parts + md_table(["method", "shots", *(f"x{f:.3g}" for f in factors), "chosen"], body,
                            "lr" + "r" * len(factors) + "l") + [""]


def summary(results: dict) -> str:
    parts = selection_section(results)
    results = reported(results)
    names = regimes_of(results)
    for name in names:
        view = regime_view(results, name)
        if not view["rows"]:
            continue
        if len(names) > 1:
            parts += [f"## Source models of the `{name}` regime", ""]
        parts += unsupervised_summary(view) + few_label_table(view["rows"]) + numbers_table(view["rows"])
    return "\n".join(parts).rstrip()


def per_source_table(results: dict) -> str:
    """Target x source route accuracy (mean over seeds) as trained / with target
    statistics, with what each method chose."""
    rows = results["rows"]
    targets = list(dict.fromkeys(r["task"] for r in rows))
    used = {r["source"] for r in rows if r["method"] in ANALYSIS}
    sources = [d for d in results["config"]["domains"] if d in used]
    # one method per label-free score a source was chosen by: the first, in registry order, whose rows carry it
    choosers: dict[str, str] = {}
    for m in ADAPT:
        score = next((r.get("score") for r in rows if r["method"] == m.row and r.get("chosen")), None)
        if score and score not in choosers:
            choosers[score] = m.row
    header = ["target", *(short(s) for s in sources), *(f"chosen by {score} ({m})" for score, m in choosers.items())]
    choosers = list(choosers.values())
    body = []
    for t in targets:
        cells = []
        for s in sources:
            vals = []
            for m in ANALYSIS:
                v = [r["value"] for r in rows if r["method"] == m and r["task"] == t and r["source"] == s]
                vals.append(f"{100 * np.mean(v):.1f}" if v else "-")
            cells.append(" / ".join(vals))
        chosen = []
        for m in choosers:
            picks = [short(r["chosen"]) for r in sorted((r for r in rows if r["method"] == m and r["task"] == t),
                                                        key=lambda r: r["seed"])]
            chosen.append(" / ".join(picks) or "-")
        body.append([short(t), *cells, *chosen])
    return "\n".join(md_table(header, body, "l" + "r" * len(sources) + "l" * len(choosers)))


def write_report(out: Path, results: dict) -> Path:
    """Draw the figures and write `report.md` from `results`."""
    cfg = results["config"]
    results = reported(results)
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
    all_routes = [r for name in regimes_of(results) for r in regime_view(results, name)["routes"].values()]
    kept = {m: [r[m]["kept"] for r in all_routes if r.get(m, {}).get("kept") is not None]
            for m in dict.fromkeys(k for r in all_routes for k in r)}
    kept = {m: v for m, v in kept.items() if v}
    if kept:
        parts += ["Learned routes kept (their IM score beat the starting source route's; otherwise it was restored): "
                  + ", ".join(f"{m} {sum(v)} of {len(v)}" for m, v in kept.items()) + ".", ""]
    parts += ["## Each source route on each target", "",
              "Accuracy of every source route on each target (mean over seeds), as trained / with statistics "
              "re-estimated on the target images, and the source each unsupervised choice picked (per seed).", "",
              per_source_table(results), ""]
    unsupervised = [r for r in rows if r.get("setting") != "few_labels"]
    if unsupervised:
        report.plot_task_accuracy(unsupervised, out / "accuracy.png")
        parts += ["![accuracy per target](accuracy.png)", ""]
    for name in regimes_of(results):
        view = regime_view(results, name)
        figure = f"numbers-{name}.png"
        if plot_numbers(numbers_rows(view["rows"]), out / figure, f"digits5 targets, {name} source models"):
            parts += [f"![accuracy against numbers changed, {name}]({figure})", ""]
        parts += routes_section(out, view, name)
    shown = list(dict.fromkeys(cfg["domains"] + cfg["targets"]))
    plot_samples({short(d): load_task(d).x_test[:12].numpy() for d in shown}, out / "samples.png")
    parts += ["## Samples", "", "Test images of each domain.", "", "![samples](samples.png)", ""]
    models = results.get("source_models", {})
    if models:
        parts += ["## Source models", "", *md_table(
            ["domain left out, seed", "source test accuracy", "seconds"],
            [[k, ", ".join(f"{short(t)} {100 * a:.1f}" for t, a in v["test_acc"].items()), v["seconds"]]
             for k, v in models.items()], "llr"), ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def plot_numbers(found: list[dict], path: Path, title: str) -> Path | None:
    """Accuracy against the numbers a method changes (log scale), one marker per method;
    filled for the few-label setting."""
    found = [o for o in found if o["numbers"] > 0]
    if not found:
        return None
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for o in found:
        few = o["setting"] == "few_labels"
        ax.scatter(o["numbers"], 100 * o["acc"], marker="o" if few else "s", s=40,
                   facecolors="tab:red" if few else "none", edgecolors="tab:red" if few else "tab:blue")
        ax.annotate(o["method"], (o["numbers"], 100 * o["acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="numbers the method changes", ylabel="mean test accuracy (%)",
           title=f"{title} (filled: 10 labels a class; open: unlabelled)")
    ax.grid(alpha=0.3)
    return report.save_figure(fig, path)


def routes_section(out: Path, results: dict, name: str = CONFIGURED) -> list[str]:
    """The first seed's source routes and learned target routes, drawn, with their heading."""
    cfg = results["config"]
    first = min(cfg["seeds"]) if cfg["seeds"] else None
    panels, chosen = {}, {}
    n = cfg["model"]["num_modules"] if name == CONFIGURED else REGIMES[name].pool_size(cfg["model"]["steps"])
    for key, r in results.get("routes", {}).items():
        if not key.endswith(f"-s{first}"):
            continue
        target = key.rsplit("-s", 1)[0]
        for s, route in r.get("sources", {}).items():
            label = f"{target}: source {short(s)}"
            panels[label], chosen[label] = np.eye(n)[route], route
        for m in ADAPT.where(lambda m: m.learns_route and m.setting != "few_labels"):
            learned = r.get(m)
            if not learned:
                continue
            label = f"{target}: {m}" + ("" if learned.get("kept", True) else ", undone")
            panels[label] = np.asarray(learned.get("soft") or learned.get("soft_at_discretize")
                                       or np.eye(n)[learned["discrete"]])
            chosen[label] = learned["discrete"]
    if not panels:
        return []
    figure = "routes.png" if name == CONFIGURED else f"routes-{name}.png"
    report.plot_usage(panels, out / figure, chosen=chosen, cols=len(cfg["domains"]) + 2,
                      title="per target: the source routes, then the target's learned routes (soft weights: "
                            "route_im's before discretising, the aligned ones as kept; dots: the argmax, "
                            "route_im's start when undone)")
    return [f"## Routes ({name} source models)", "", f"Seed {first}.", "", f"![routes]({figure})", ""]


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


