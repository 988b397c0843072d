"""`isomod bench transfer`: a pool pre-trained on some tasks, reused for held-out tasks by
route-only transfer and by the usual baselines, with the same data and budget for all.

Route-only, head-only and norms+head train a few thousand numbers and use the transfer
budget's learning rate; fine-tuning and scratch train whole networks and use the
pre-training learning rate instead. Same steps and batches for all.

Route search runs come with an analysis of where the search goes wrong: every route it
scored is run on (up to) 1,000 test images with the statistics the search estimated, and
classified by the nearest class mean of the labelled images its proxy scored. The row
carries the rank correlation (Spearman) of the proxy with that test accuracy over the
routes (`proxy_test_spearman`), and a `METHOD_hindsight` row (e.g. `route_search_hindsight`;
`setting: analysis`, chosen with test labels) gives the test accuracy of the route best on
test, its head trained as the search's.

Rows of the route methods also carry `route_form` (whether `value` is the accuracy of a
soft route or of a discrete one), `acc_soft` (where the route is soft) and `acc_discretized`
(the discrete route: a soft route's argmax, or the route itself when it is discrete). The
argmax of a method that trains the step norms (`route_only`) has its statistics re-estimated
on the task's training images; one over frozen norms (`route_head`) keeps the source's, as
the method does (re-estimated, they would change the features its head was trained on).

Pre-training runs once per seed (kept in `OUT/pretrain-s{seed}/checkpoint`, reused when
the command runs again); every transfer run then starts from a fresh copy of that model.
Rows are written to `results.json` as they come, and a second run of the same command
(same configuration) skips the rows it already has, so a stopped benchmark resumes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from isomod.bench import report
from isomod.methods.transfer import TRANSFER, TRANSFER_METHODS, TRANSFER_TRAIN, few_shot, select_source, transfer
from isomod.bench.models import train_modular
from isomod.bench.base import Bench, Context, Job, check_seeds, register
from isomod.bench.docs import md_table
from isomod.bench.results import Row
from isomod.bench.metrics import route_accuracies
from isomod.bench.workers import check_jobs
from isomod.bench.paired import INTERVAL, pair
from isomod.io.checkpoint import load_checkpoint
from isomod.data.tasks import TaskData, load_task, split_validation
from isomod.errors import IsomodError, check_choices
from isomod.core.network import ModelConfig
from isomod.training.regimes import DEFAULT_REGIME, REGIMES
from isomod.methods.search import SearchConfig
from isomod.training.trainer import TrainConfig, Trainer
from isomod.files import write_text_atomic
from isomod import seeds

PRETRAIN = ["glyphs/latin_upper", "glyphs/latin_lower", "glyphs/digits", "glyphs/greek", "glyphs/cyrillic",
            "glyphs/armenian"]
HELD_OUT = ["glyphs/georgian", "glyphs/hebrew", "mnist", "uci-digits", "fashion-mnist"]


@dataclass
class TransferBenchConfig:
    """`isomod bench transfer`: pre-train once per seed, then learn every held-out task
    with every method and shot count on the same budget.

    Args:
        pretrain_tasks: the tasks the pool is trained on.
        held_out: tasks never seen in pre-training, each learned afresh by every method.
        shots: training images per class: positive integers, or `all`.
        methods: the transfer methods (`isomod transfer --help` says what each trains); by
            default all of them.
        seeds: one pre-training and one set of transfer runs per seed.
        data_dir: where data that is not embedded (Fashion-MNIST) is looked for first.
        regimes: the route regimes of pre-training (`isomod.training.regimes`), one pool per regime
            and seed; a regime sets the pool size and the route fields of `model` and
            `pretrain`. Every row carries its pool's `regime`.
        validation: hold out this fraction of each held-out task's training images and
            report accuracy on them instead of the test split (for choosing the transfer
            budget's hyper-parameters); 0 reports the test split.
        model: the pre-trained model's shape (scratch uses the same).
        pretrain: the multi-task pre-training budget: 7,500 steps of 128 images over six
            tasks give each task the exposure of `bench mtl`'s converged 10,000 over eight.
        transfer: the budget of every transfer run, whatever the method; its `routes`
            says whether a learned route stays soft (`soft`, the default: a route over an
            annealed pool kept the source's argmax at every step in the validation runs of
            docs/results/transfer.md, so discretising returns the source's route) or is
            annealed and discretised (`annealed`).
        jobs: training runs side by side, each in its own process with an equal share
            of the threads.
        search: how `route_search` searches (strategy, proxy, budget); its seed is the run's.
        pretrain_dir: the folder holding (or to hold) the pre-trained pools,
            `pretrain-{regime}-s{seed}/checkpoint`; empty: the output folder. Runs of other
            transfer budgets can share one pre-training this way.
    """

    pretrain_tasks: list[str] = field(default_factory=lambda: list(PRETRAIN))
    held_out: list[str] = field(default_factory=lambda: list(HELD_OUT))
    shots: list[int | str] = field(default_factory=lambda: [10, "all"])
    methods: list[str] = field(default_factory=lambda: list(TRANSFER_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_dir: str = ""
    regimes: list[str] = field(default_factory=lambda: [DEFAULT_REGIME])
    validation: float = 0.0
    jobs: int = 1
    pretrain_dir: str = ""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(channels=32, num_modules=16, steps=8, stem_stride=4))
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=7500, batch_size=128, lr=5e-3, lr_heads=5e-3, checkpoint_every=500, log_every=25))
    transfer: TrainConfig = field(default_factory=lambda: replace(TRANSFER_TRAIN, steps=400, routes="soft"))
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self):
        check_choices("transfer method", self.methods, TRANSFER_METHODS)
        check_choices("route regime", self.regimes, tuple(REGIMES))
        if not self.regimes:
            raise IsomodError("give at least one regime")
        if not 0 <= self.validation < 1:
            raise IsomodError(f"validation must lie in [0, 1), got {self.validation}")
        check_jobs(self.jobs)
        for k in self.shots:
            if k != "all" and not (isinstance(k, int) and k > 0):
                raise IsomodError(f"shots: expected positive numbers of images per class or 'all', got {k!r}")
        check_seeds(self.seeds)


def shots_label(shots: int | None) -> int | str:
    return "all" if shots is None else shots


def pretrain_dir(config: TransferBenchConfig, out: Path, regime_name: str, seed: int) -> Path:
    return (Path(config.pretrain_dir) if config.pretrain_dir else out) / f"pretrain-{regime_name}-s{seed}"


def plan(ctx: Context):
    """Pre-training of every regime and seed (reloaded when its checkpoint is complete),
    then one job per pool, held-out task, shot count and method that the results lack."""
    config, results = ctx.config, ctx.results
    pre_data = [load_task(t, data_dir=config.data_dir or None) for t in config.pretrain_tasks]
    ctx.say(f"== pre-training on {len(pre_data)} tasks ({', '.join(config.regimes)}), seeds {config.seeds}")
    pre_accs = {}
    pools = [(r, seed) for r in config.regimes for seed in config.seeds]
    yield [Job(pretrain_one, (pretrain_dir(config, ctx.out, r, seed), pre_data,
                              *REGIMES[r].apply(config.model, config.pretrain), seed, ctx.progress),
               lambda results, accs, key=(r, seed): pre_accs.update({key: accs})) for r, seed in pools]
    runs = []
    for r, seed in pools:
        run_dir = pretrain_dir(config, ctx.out, r, seed)
        base = load_checkpoint(run_dir / "checkpoint").eval()
        results["pretrain"].setdefault(r, {})[f"s{seed}"] = {
            "test_acc": pre_accs[(r, seed)], "params": base.param_count(), "modules": len(base.pool),
            "routes": {n: base.route(n).indices() for n in base.task_names},
            "route_weights": {n: w.tolist() for n, w in base.usage().items()}}
        for name in config.held_out:
            data = held_out_task(name, config.data_dir or None, config.validation)
            source, scores = select_source(base, data, seed=seed)
            results["sources"].setdefault(r, {})[f"{data.name}-s{seed}"] = {"source": source, "scores": scores}
            runs += [Job(transfer_one, (run_dir, config, r, seed, name, label, method, source, ctx.progress),
                         lambda results, out: record_transfer(ctx, out))
                     for label in config.shots for method in config.methods
                     if not results.has(method=method, task=data.name, shots=label, seed=seed, regime=r)]
    yield runs


HINDSIGHT = "_hindsight"  # suffix of the analysis rows: the route a search scored that is best on test
ANALYSIS_TEST_IMAGES = 1000


def record_transfer(ctx: Context, output: tuple[list[Row], dict | None, float]) -> None:
    rows, route, seconds = output
    row = rows[0]
    f = row.fields
    key = f"{row.task}/{f['shots']}"
    ctx.results["train_seconds"][f"{f['regime']}/{row.method}/{key}/{f['seed']}"] = seconds
    ctx.results.add(*rows)
    if route is not None:
        ctx.results["routes"].setdefault(f["regime"], {})[f"{row.method}:{key}-s{f['seed']}"] = route
    if ctx.config.jobs > 1:
        ctx.say(f"== {f['regime']}: {row.method} -> {row.task}, shots {f['shots']}, seed {f['seed']}: "
                f"{100 * row.value:.1f} ({seconds:.0f} s)")


def pretrain_one(run_dir: Path, tasks: list, model_config: ModelConfig, train_config: TrainConfig, seed: int,
                 progress: bool) -> dict[str, float]:
    """Pre-train (or reload) the pool of one seed in `run_dir`; its test accuracy per task."""
    return train_modular(run_dir, tasks, model_config, train_config, seed, progress)[1]


@functools.lru_cache(maxsize=None)
def held_out_task(name: str, data_dir: str | None, validation: float) -> TaskData:
    """A held-out task's data, read once per process (with its validation split when asked)."""
    data = load_task(name, data_dir=data_dir)
    return split_validation(data, validation) if validation else data


def transfer_one(run_dir: Path, config: TransferBenchConfig, regime_name: str, seed: int, name: str,
                 label: int | str, method: str, source: str, progress: bool) -> tuple[list[Row], dict | None, float]:
    """One transfer run on a fresh copy of a pre-trained pool (in `run_dir`): its row (and,
    for route_search, the hindsight analysis row), the learned route (route methods) and its
    training seconds."""
    base = load_checkpoint(run_dir / "checkpoint").eval()
    data = held_out_task(name, config.data_dir or None, config.validation)
    task = few_shot(data, None if label == "all" else label, seed=seed)
    cfg = replace(config.transfer, seed=seed)
    if TRANSFER[method].whole_network:
        cfg = replace(cfg, lr=config.pretrain.lr, lr_heads=config.pretrain.lr)
    if progress:
        print(f"== {regime_name}: {method} -> {data.name}, shots {label}, seed {seed} (source {source})", flush=True)
    params = base.param_count()
    t0 = time.time()
    options = {"search": replace(config.search, seed=seed)} if TRANSFER[method].searches else {}
    res = transfer(base, task, method, cfg, source=source, progress=progress, **options)
    seconds = round(time.time() - t0, 1)
    fields = {"shots": label, "params_total": params + res.params_task, "params_task": res.params_task,
              "seed": seed, "source": source, "regime": regime_name, "block": base.config.block, **res.info}
    route = None
    if res.route_steps_changed is not None:
        fields.update(route_steps_changed=res.route_steps_changed, route_change=res.route_change,
                      **route_accuracies(res.model, task, res.test_acc, res.soft_route,
                                         reestimate="norms" in TRANSFER[method].changes))
        route = {"discrete": res.model.route(data.name).indices(), "soft_at_discretize": res.soft_route,
                 "final": res.model.route(data.name).weights().tolist()}
    metric = "val_acc" if config.validation else "test_acc"
    rows = [Row(method, data.name, metric, round(res.test_acc, 5), fields)]
    if res.search is not None and not config.validation:
        analysis, acc = search_hindsight(run_dir, task, data, source, res.search, cfg)
        fields.update(analysis)
        rows.append(Row(method + HINDSIGHT, data.name, metric, round(acc, 5), {**fields, "setting": "analysis",
                                                                      "params_task": res.params_task}))
    return rows, route, seconds


def search_hindsight(run_dir: Path, task: TaskData, data: TaskData, source: str, found, config: TrainConfig
                     ) -> tuple[dict, float]:
    """Where a route search went wrong: every route it scored, with the statistics it
    estimated (the same images), run on up to ANALYSIS_TEST_IMAGES test images of `data` and
    classified by the nearest class mean (cosine) of the labelled images its proxy scored.
    Returns the proxy's rank correlation with that test accuracy, the found and the best
    route's test accuracy this way, and the test accuracy of the best route with a head
    trained as route_search's (chosen with test labels: analysis only)."""
    from scipy.stats import spearmanr

    seeds.seed(config.seed)  # the new head, as transfer() seeds it
    model = load_checkpoint(run_dir / "checkpoint").eval()
    model.add_task(task.spec, source=source)
    name, k = task.name, task.spec.num_classes
    xs, ys = task.x_train[found.proxy_indices], task.y_train[found.proxy_indices]
    g = torch.Generator().manual_seed(config.seed)
    keep = torch.randperm(len(data.y_test), generator=g)[:ANALYSIS_TEST_IMAGES]
    xt, yt = data.x_test[keep], data.y_test[keep]
    test = {}
    for route in found.scored:
        model.route(name).set_choice(list(route))
        model.estimate_stats(found.stats_images, name)
        means = torch.zeros(k, model.config.channels, dtype=torch.float64).index_add_(
            0, ys, F.normalize(model.features(xs, name).double(), dim=1))
        sim = F.normalize(model.features(xt, name).double(), dim=1) @ F.normalize(means, dim=1).T  # (B, K)
        test[route] = (sim.argmax(1) == yt).double().mean().item()
    routes = list(found.scored)
    rho = spearmanr([found.scored[r] for r in routes], [test[r] for r in routes]).statistic if len(routes) > 2 else None
    best = max(routes, key=lambda r: test[r])
    model.route(name).set_choice(list(best))
    model.estimate_stats(found.stats_images, name)
    trainer = Trainer(model, {name: task}, config, progress=False, train_tasks=[name],
                      params=model.param_groups([name], roles=("heads",)), fixed_stats=[model.branch(name).norms])
    acc = trainer.fit()[name]
    rho = None if rho is None or not np.isfinite(rho) else round(float(rho), 4)
    return {"proxy_test_spearman": rho, "found_test_ncm": round(test[tuple(found.route)], 5),
            "hindsight_test_ncm": round(test[best], 5), "hindsight_route": list(best)}, acc


def summary(rows: list[dict]) -> dict:
    """Mean and spread (max - min) of accuracy over seeds by (method, task, shots), and mean
    added parameters."""
    acc: dict = {}
    params: dict = {}
    for r in rows:
        acc.setdefault((r["method"], r["task"], r["shots"]), []).append(r["value"])
        params.setdefault((r["method"], r["task"]), []).append(r["params_task"])
    return {"acc": {k: float(np.mean(v)) for k, v in acc.items()},
            "spread": {k: float(np.max(v) - np.min(v)) for k, v in acc.items()},
            "params": {k: int(np.mean(v)) for k, v in params.items()}}


def markdown_table(results: dict) -> str:
    """One row per held-out task and shot count, one column per method (the mean over seeds,
    and the spread when there are several); then added parameters."""
    cfg = results["config"]
    s = summary(results["rows"])
    several = len({r["seed"] for r in results["rows"]}) > 1
    methods = [m for m in cfg["methods"] if any(k[0] == m for k in s["acc"])]
    body = []
    tasks = list(dict.fromkeys(r["task"] for r in results["rows"]))
    for task in tasks:
        for shots in cfg["shots"]:
            vals = [s["acc"].get((m, task, shots)) for m in methods]
            if all(v is None for v in vals):
                continue
            best = max(v for v in vals if v is not None)
            cells = []
            for m, v in zip(methods, vals):
                if v is None:
                    cells.append("")
                    continue
                cell = f"**{100 * v:.1f}**" if v == best else f"{100 * v:.1f}"
                cells.append(cell + (f" ({100 * s['spread'][(m, task, shots)]:.1f})" if several else ""))
            body.append([task, shots, *cells])
    for shots in cfg["shots"]:
        means = []
        for m in methods:
            vals = [s["acc"][(m, t, shots)] for t in tasks if (m, t, shots) in s["acc"]]
            means.append(f"{100 * np.mean(vals):.1f}" if vals else "")
        if any(means):
            body.append(["**mean**", shots, *means])
    pre = next(iter(results.get("pretrain", {}).values()), {}).get("params")
    for task in tasks:
        cells = []
        for m in methods:
            p = s["params"].get((m, task))
            cells.append("" if p is None else f"{p:,}" + (f" ({100 * p / pre:.2f}%)" if pre else ""))
        body.append([f"params added: {task}", "", *cells])
    lines = md_table(["task", "shots", *methods], body, "lr" + "r" * len(methods))
    if several:
        lines += ["", "Cells: the mean over seeds, and in brackets the spread (max - min)."]
    return "\n".join(lines)


def pairs() -> list[tuple[str, str]]:
    """The method pairs the bench compares: each method with those it names (`compare`)."""
    return [(m.name, other) for m in TRANSFER for other in m.compare]


def paired_gaps(rows: list[dict], a: str, b: str, shots: int | str) -> dict | None:
    """Accuracy of method `a` minus method `b` in runs with the same task, shots and seed:
    the mean over all such runs, the mean per seed, and in how many runs `a` is ahead."""
    by = {(r["method"], r["task"], r["shots"], r["seed"]): r["value"] for r in rows}
    gaps = {(t, seed): v - by[(b, t, k, seed)] for (m, t, k, seed), v in by.items()
            if m == a and k == shots and (b, t, k, seed) in by}
    if not gaps:
        return None
    seeds = sorted({seed for _, seed in gaps})
    per_seed = {seed: float(np.mean([g for (_, s_), g in gaps.items() if s_ == seed])) for seed in seeds}
    return {"mean": float(np.mean(list(gaps.values()))), "per_seed": per_seed,
            "ahead": sum(g > 0 for g in gaps.values()), "runs": len(gaps)}


def comparisons(results: dict) -> str:
    """The method pairs the bench exists to compare, run by run (same task, shots and seed):
    the mean gap in points, its range over seeds (the mean gap of each seed), and how often
    the first method is ahead; then each method's share of a whole network's accuracy it is
    compared with, with all data."""
    rows, shots_list = results["rows"], results["config"]["shots"]
    body = []
    for a, b in pairs():
        for shots in shots_list:
            g = paired_gaps(rows, a, b, shots)
            if g is None:
                continue
            lo, hi = min(g["per_seed"].values()), max(g["per_seed"].values())
            body.append([f"{a} - {b}", shots, f"{100 * g['mean']:+.1f}", f"{100 * lo:+.1f} to {100 * hi:+.1f}",
                         f"{g['ahead']} of {g['runs']}"])
    if not body:
        return ""
    lines = md_table(["comparison", "shots", "mean gap (points)", "per seed", "runs ahead"], body, "lrrrr")
    acc = summary(rows)["acc"]
    tasks = dict.fromkeys(r["task"] for r in rows)
    for a, b in ((a, b) for a, b in pairs() if TRANSFER[b].whole_network):
        shares = {t: acc[(a, t, "all")] / acc[(b, t, "all")] for t in tasks
                  if (a, t, "all") in acc and acc.get((b, t, "all"))}
        if shares:
            lines += ["", f"{a} as a share of {b}'s accuracy, all data (mean over seeds): "
                      + ", ".join(f"{t} {100 * v:.1f}%" for t, v in shares.items())
                      + f"; mean {100 * np.mean(list(shares.values())):.1f}%."]
    return "\n".join(lines)


def route_forms(results: dict) -> str:
    """Each learned soft route against its argmax (one module per step, its head as trained):
    the mean test accuracy (%) of both forms, the paired difference with its range over seeds,
    and in how many runs the argmax is the source task's route."""
    body = []
    for method in dict.fromkeys(r["method"] for r in results["rows"] if r.get("route_form") == "soft"):
        for shots in results["config"]["shots"]:
            sel = [r for r in results["rows"] if r["method"] == method and r["shots"] == shots
                   and r.get("route_form") == "soft"]
            if not sel:
                continue
            gap = {seed: np.mean([r["acc_discretized"] - r["acc_soft"] for r in sel if r["seed"] == seed])
                   for seed in sorted({r["seed"] for r in sel})}
            body.append([method, shots, f"{100 * np.mean([r['acc_soft'] for r in sel]):.1f}",
                         f"{100 * np.mean([r['acc_discretized'] for r in sel]):.1f}",
                         f"{100 * np.mean([r['acc_discretized'] - r['acc_soft'] for r in sel]):+.1f}",
                         f"{100 * min(gap.values()):+.1f} to {100 * max(gap.values()):+.1f}",
                         f"{sum(r['route_steps_changed'] == 0 for r in sel)} of {len(sel)}"])
    if not body:
        return ""
    return "\n".join(md_table(["method", "shots", "soft route", "its argmax", "argmax - soft (points)", "per seed",
                               "argmax = source's route"], body, "lrrrrrr"))


def search_table(results: dict) -> str:
    """Where route search goes wrong: route_search and the route best on test in hindsight,
    each paired with head_only on (task, seed), and the rank correlation of the search's
    proxy with test accuracy over the routes it scored."""
    rows = [r for r in results["rows"] if r.get("metric") == "test_acc"]
    searches = [m for m in TRANSFER.where(lambda m: m.searches and m.learns_route)
                if any(r["method"] == m + HINDSIGHT for r in rows)]
    if not searches:
        return ""
    probe = TRANSFER.baselines("transfer")[0]
    body = []
    for shots in results["config"]["shots"]:
        at = [r for r in rows if r["shots"] == shots]
        theirs = [r for r in at if r["method"] == probe]
        for m in (name for search in searches for name in (search, search + HINDSIGHT)):
            mine = [r for r in at if r["method"] == m]
            p = pair(mine, theirs, ("task", "seed"), lambda r: r["value"], lambda r: r["value"])
            if not p.n:
                continue
            lo, hi = p.interval
            rho = [r["proxy_test_spearman"] for r in mine if r.get("proxy_test_spearman") is not None]
            corr = f"{np.mean(rho):+.2f} ({min(rho):+.2f} to {max(rho):+.2f})" if rho and m in searches else ""
            body.append([shots, m, probe, f"{p.mean:+.1f} [{lo:+.1f}, {hi:+.1f}]", p.n, corr])
    if not body:
        return ""
    return "\n".join(["Route search against the linear probe, and the route best on test in hindsight "
                      f"(`METHOD{HINDSIGHT}`, chosen with test labels: an analysis row):", "",
                      *md_table(["shots", "method", "against", f"mean difference (points), {INTERVAL}", "units",
                                 "proxy-test Spearman, mean (range)"], body, "rlllrl")])


def regimes_of(results: dict) -> list[str]:
    """The pools' regimes, in the config's order (a results file from before regimes were a
    list has one, `regime`)."""
    cfg = results["config"]
    return list(cfg.get("regimes") or [cfg.get("regime", DEFAULT_REGIME)])


def regime_view(results: dict, regime_name: str) -> dict:
    """The results of one regime's pools, as a single-regime results dict."""
    single = "regimes" not in results["config"]

    def part(key: str) -> dict:
        data = results.get(key, {})
        return data if single else data.get(regime_name, {})

    rows = [r for r in results["rows"] if r.get("regime", regime_name) == regime_name]
    return {**results, "rows": rows, "pretrain": part("pretrain"), "routes": part("routes"),
            "sources": part("sources")}


def summary_block(results: dict) -> str:
    """What `isomod report --docs` writes into docs/results/transfer.md: per pool regime,
    the accuracy table and the paired comparisons; then what each added number buys."""
    names = regimes_of(results)
    parts = []
    for name in names:
        view = regime_view(results, name)
        if not view["rows"]:
            continue
        if len(names) > 1:
            parts.append(f"#### Pools of the `{name}` regime")
        parts += [p for p in (markdown_table(view), comparisons(view), route_forms(view), search_table(view)) if p]
    return "\n\n".join(parts + [numbers_table(results)]).rstrip()


def numbers_rows(results: dict) -> list[dict]:
    """Per pool regime, shot count and method: the mean accuracy over held-out tasks (each
    the mean over seeds), the mean numbers the task added besides its head, and the gain over
    the linear probe (`head_only`) of the same pool, in points and per thousand numbers."""
    out = []
    for name in regimes_of(results):
        s = summary([r for r in regime_view(results, name)["rows"] if r["method"] in TRANSFER])
        probe_name = TRANSFER.baselines("transfer")[0]
        head = {}
        for (m, t), p in s["params"].items():
            if m == probe_name:
                head[t] = p
        for shots in results["config"]["shots"]:
            methods = dict.fromkeys(m for (m, t, k) in s["acc"] if k == shots)
            probe = [s["acc"][(probe_name, t, shots)] for (m, t, k) in s["acc"] if m == probe_name and k == shots]
            for m in methods:
                tasks = [t for (mm, t, k) in s["acc"] if mm == m and k == shots]
                acc = float(np.mean([s["acc"][(m, t, shots)] for t in tasks]))
                extra = float(np.mean([s["params"][(m, t)] - head.get(t, 0) for t in tasks]))
                gain = acc - float(np.mean(probe)) if probe else None
                out.append({"regime": name, "shots": shots, "method": m, "acc": acc, "numbers": extra, "gain": gain,
                            "gain_per_k": None if gain is None or extra <= 0 else 1000 * gain / extra})
    return out


def numbers_table(results: dict) -> str:
    found = [o for o in numbers_rows(results) if not TRANSFER[o["method"]].whole_network or o["numbers"] > 0]
    if not found:
        return ""
    lines = ["#### What each added number buys", "",
             "Mean accuracy over the held-out tasks against the numbers a method adds besides a new head (mean over "
             "tasks and seeds), and its gain over the linear probe of the same pool "
             f"(`{TRANSFER.baselines('transfer')[0]}`), in points and per "
             "thousand numbers.", ""]
    body = [[o["regime"], o["shots"], o["method"], f"{o['numbers']:,.0f}", f"{100 * o['acc']:.1f}",
             "" if o["gain"] is None else f"{100 * o['gain']:+.1f}",
             "" if o["gain_per_k"] is None else f"{100 * o['gain_per_k']:+.3f}"]
            for o in sorted(found, key=lambda o: (o["regime"], str(o["shots"]), o["numbers"]))]
    lines += md_table(["pool", "shots", "method", "numbers besides the head", "accuracy",
                       f"gain over {TRANSFER.baselines('transfer')[0]}", "per 1,000 numbers"], body, "lrlrrrr")
    return "\n".join(lines)


def route_changes(rows: list[dict]) -> list[str]:
    """Per route method: in how many runs the learned route differs from the source's, by
    how many steps (argmax) and by how much weight (total variation) on average."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows if "route_steps_changed" in r):
        sel = [r for r in rows if r["method"] == method and "route_steps_changed" in r]
        changed = [r["route_steps_changed"] for r in sel]
        tv = [r["route_change"] for r in sel if r.get("route_change") is not None]
        weight = f", weight moved {np.mean(tv):.3f} on average (total variation per step)" if tv else ""
        out.append(f"- {method}: a different module at some step in {sum(c > 0 for c in changed)} of {len(changed)} "
                   f"runs, {np.mean(changed):.2f} steps on average{weight}")
    return out


def write_report(out: Path, results: dict) -> Path:
    """Draw the figures and write `report.md` from `results`."""
    cfg = results["config"]
    rows = results["rows"]
    parts = ["# isomod bench transfer", "",
             f"Pools pre-trained ({', '.join(regimes_of(results))} regime) on {', '.join(cfg['pretrain_tasks'])} "
             f"({cfg['pretrain']['steps']} steps), then each held-out task learned by every method with the same "
             f"budget: {cfg['transfer']['steps']} steps of up to {cfg['transfer']['batch_size']} images (learning rate "
             f"{cfg['transfer']['lr']:g}; {cfg['pretrain']['lr']:g}, the pre-training rate, for finetune and scratch, "
             f"which train whole networks; learned routes {'stay soft' if cfg['transfer']['routes'] == 'soft' else 'are annealed and discretised'}). "
             f"{'Validation' if cfg.get('validation') else 'Test'} accuracy (%), mean over seeds {cfg['seeds']}; "
             "shots = training images per class.", "",
             summary_block(results), ""]
    if rows:
        plot_transfer(rows, out / "accuracy_vs_params.png")
        parts += ["![accuracy against added parameters](accuracy_vs_params.png)", ""]
    for name in regimes_of(results):
        parts += regime_sections(out, regime_view(results, name), name)
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def regime_sections(out: Path, view: dict, name: str) -> list[str]:
    """The report's sections on one regime's pools: route changes, routes, sources, pre-training."""
    parts = [f"## Pools of the `{name}` regime", ""]
    moved = route_changes(view["rows"])
    if moved:
        parts += ["Did the learned route leave the source's? Steps whose module (the argmax, for a soft route) "
                  "differs from the source route's:", "", *moved, ""]
    parts += routes_section(out, view, name)
    if view["sources"]:
        parts += ["### Source task", "",
                  "The pre-training task whose frozen features separate the new classes best (nearest-class-mean "
                  "accuracy); every method but scratch starts from its norms, head-only, norms+head and fine-tuning "
                  "keep its route, and the route methods start their own route from it.", "",
                  *md_table(["held-out task", "source", "score"],
                            [[k, v["source"], f"{v['scores'][v['source']]:.3f}"] for k, v in view["sources"].items()],
                            "llr"), ""]
    if view["pretrain"]:
        parts += ["### Pre-training", "", *md_table(
            ["seed", "mean test acc", "parameters"],
            [[s, f"{100 * np.mean(list(v['test_acc'].values())):.1f}", f"{v['params']:,}"]
             for s, v in view["pretrain"].items()], "lrr"), ""]
    return parts


def routes_section(out: Path, results: dict, name: str = "") -> list[str]:
    """Each held-out task's route learned by route_only (all data, first seed) next to the
    two pre-training routes it resembles most, drawn, with its heading."""
    cfg = results["config"]
    first_seed = next(iter(results.get("pretrain", {})), None)
    if not (first_seed and results.get("routes")):
        return []
    pre = results["pretrain"][first_seed]
    n = pre.get("modules", cfg["model"]["num_modules"])
    pre_weights = pre.get("route_weights") or {p: np.eye(n)[r].tolist() for p, r in pre["routes"].items()}
    panels, chosen = {}, {}
    for key, route in results["routes"].items():
        method, _, rest = key.rpartition(":")
        if not rest.endswith(f"/all-{first_seed}") or method not in ("", TRANSFER.default()):
            continue
        task = rest.rsplit("/", 1)[0]
        new = np.asarray(route.get("soft_at_discretize") or route.get("final") or np.eye(n)[route["discrete"]])
        names, sim = report.route_similarity({"new": new, **pre_weights})
        sims = dict(zip(names[1:], sim[0, 1:].tolist()))
        panels[f"new: {task}"] = new
        chosen[f"new: {task}"] = route["discrete"]
        for p in sorted(sims, key=sims.get, reverse=True)[:2]:
            label = f"{task.rsplit('/', 1)[-1]} ~ {p.rsplit('/', 1)[-1]} ({sims[p]:.2f})"
            panels[label] = np.asarray(pre_weights[p])
            chosen[label] = pre["routes"][p]
    if not panels:
        return []
    figure = f"routes-{name}.png" if name else "routes.png"
    report.plot_usage(panels, out / figure, chosen=chosen, cols=3,
                      title="route_only: the new task's route (its soft weights) next to the two most "
                            "similar pre-training routes")
    return ["### Routes", "",
            "Each held-out task's route learned by route_only (all data, first seed) next to the two "
            "pre-training routes it resembles most (similarity: the probability that both run the same "
            "module at a step, averaged over steps).", "", f"![routes]({figure})", ""]


def plot_transfer(rows: list[dict], path: Path) -> Path:
    """Test accuracy against the numbers a task added (log scale), one panel per shot count,
    one marker per method and pool regime (a shade per regime), averaged over held-out tasks
    and seeds."""
    plt = report.pyplot()
    shots = list(dict.fromkeys(r["shots"] for r in rows))
    regimes = list(dict.fromkeys(r.get("regime", DEFAULT_REGIME) for r in rows))
    fig, axes = plt.subplots(1, len(shots), figsize=(4.6 * len(shots), 3.8), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], shots):
        for i, name in enumerate(regimes):
            for method in dict.fromkeys(r["method"] for r in rows):
                sel = [r for r in rows if r["shots"] == k and r["method"] == method
                       and r.get("regime", DEFAULT_REGIME) == name]
                if not sel:
                    continue
                marker, color = TRANSFER[method].style if method in TRANSFER else ("o", "tab:gray")
                alpha = 1.0 - 0.35 * i
                ax.scatter([r["params_task"] for r in sel], [100 * r["value"] for r in sel], marker=marker,
                           color=color, alpha=0.25 * alpha, s=14)
                ax.scatter([np.mean([r["params_task"] for r in sel])], [100 * np.mean([r["value"] for r in sel])],
                           marker=marker, color=color, alpha=alpha, s=80, edgecolors="black",
                           label=method if len(regimes) == 1 else f"{method} ({name})")
        ax.set_xscale("log")
        ax.set_title(f"{k} images per class" if k != "all" else "all training images", fontsize=10)
        ax.set_xlabel("numbers added for the task")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=6, loc="lower right", ncol=1 + len(regimes) // 2)
    fig.suptitle("small markers: one held-out task and seed; large: their mean", fontsize=10)
    return report.save_figure(fig, path)


BENCH = register(Bench("transfer", "route-only transfer vs head-only, norms+head, fine-tuning and scratch on held-out "
                       "tasks", TransferBenchConfig, plan, write_report, summary_block, unprefixed="transfer",
                       device=lambda c: c.pretrain.device, extra=("pretrain", "routes", "sources", "train_seconds"),
                       extensible=("methods", "shots", "seeds", "held_out", "regimes"),
                       hidden=("pretrain.seed", "transfer.seed", "search.seed", "model.num_modules")))
run = BENCH.run
