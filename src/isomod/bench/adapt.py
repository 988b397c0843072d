"""`isomod bench adapt`: unsupervised multi-source domain adaptation on `digits5`,
leave one domain out, and on MNIST-C style corruptions of `digits5/mnist`.

For every target domain and seed, a ModularNet is trained on the other domains (one
route and set of step norms per domain; shared stem, pool and head): for a `digits5`
target the four other domains, for an `mnistc` target all five (one model per seed
serves every corruption). The target's training images, without labels, are then given
to every method of `isomod.methods.adapt`, in both settings (`setting`: `source_free`, or
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

Learning rates are chosen by a named rule that reads no label of a reported target
(`SELECTION_RULE`): each method that trains is run on a development target,
`mnistc/motion_blur` (`dev_target`; never reported, never a source), at its default learning
rates and at a third and three times them (`FACTORS`), from each source model (the model a
target adapts from, which never saw that target's labels) and seed; few-label methods at the
largest shot count. The factor with the best development accuracy is used on every target
that model adapts to, at every shot count (ties keep the default). Those runs are rows with
`selection: true` and `model` (the source model's left-out domain, or `all`); every other
row of a tuned method carries the `factor` it used, and `results.json` records the rule, the
grid and the choices under `selection`.

Rows of methods whose result is a route also carry `route_form` (whether `value` is the
accuracy of a soft route or of a discrete one), `acc_soft` (where a soft route existed) and
`acc_discretized` (the discrete route: the soft route's argmax with statistics re-estimated,
or the route itself when it is discrete).

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
import torch

from isomod.data import digits5, mnistc
from isomod.bench.metrics import discretized, route_accuracies
from isomod.bench.models import train_modular
from isomod.bench.adapt_report import (ANALYSIS, CONFIGURED, FEW_LABEL_METHODS, ORACLE, hindsight_rows, short,
                                       summary, write_report)
from isomod.bench.base import Bench, Context, Job, check_seeds, register
from isomod.bench.results import Row, renamed
from isomod.bench.workers import check_jobs
from isomod.io.checkpoint import load_checkpoint
from isomod.data.mnistc import DEVELOPMENT
from isomod.data.tasks import TaskData, load_task
from isomod.errors import IsomodError, check_choices
from isomod.core.network import ModelConfig, ModularNet
from isomod.training.regimes import REGIMES
from isomod.methods.search import SearchConfig
from isomod.training.trainer import TrainConfig, evaluate
from isomod.methods.transfer import few_shot
from isomod.methods.adapt import (ADAPT, ADAPT_METHODS, ADAPT_TRAIN, ALIGN_ROUTE_METHODS, ROUTE_METHODS, adapt,
                          add_as_copy, route_oracle, setting)

DOMAINS = [f"digits5/{d}" for d in digits5.DOMAINS]
CORRUPTED = [f"mnistc/{c}" for c in mnistc.CORRUPTIONS]
DEFAULT_CORRUPTIONS = ("shot_noise", "shear", "scale")  # the corruptions the authors adapted to
DEV_TARGET = f"mnistc/{DEVELOPMENT[0]}"
FACTORS = (1.0, 1 / 3, 3.0)  # the learning rates tried, as factors of the defaults; the first wins ties
SELECTION_RULE = ("learning rates by development-target accuracy: each tuned method at its default learning rates "
                  "times 1, 1/3 and 3, on {dev} (never reported), from each source model (which never saw the labels "
                  "of the targets it adapts to) and seed, few-label methods at {shots} labels a class; the best factor "
                  "is used on every target that model adapts to, at every shot count, ties keeping the default")


@dataclass
class AdaptBenchConfig:
    """`isomod bench adapt`: leave each target out of `domains`, train on the rest, adapt
    to it with every method.

    Args:
        targets: the domains adapted to, each in turn: a domain of `domains` (the others
            are its sources) or a corruption `mnistc/*` (all of `domains` are sources);
            by default every domain and the three corruptions the authors adapted to.
        methods: the unsupervised methods (`source_free` and `with_sources`; `isomod adapt
            --help`).
        sources_train: also run the route alignment methods (route_moment,
            route_adversarial) while stem, pool, head and the sources keep training on the
            sources' labels (rows carry `sources_train: true`).
        few_label_methods: the methods of the `few_labels` setting (route, route_search,
            norm_patch, route_norms, head_only, finetune, and adabn as their common start).
        shots: labelled target images per class in the `few_labels` setting.
        few_label_targets: the targets of the `few_labels` setting (by default every target).
        seeds: one source model and one set of adaptations per seed and target.
        domains: the source domains of the benchmark.
        regimes: the route regimes of the source models: `configured` (the `model` and
            `source` configs as they are) or a regime of `isomod.training.regimes` applied to them.
        jobs: source models, then adaptations, side by side, each in its own process with
            an equal share of the threads.
        model: the multi-source model's shape. `permutation` starts every source domain
            on its own order of the shared modules, so the sources end with different
            routes and choosing among them matters. The stem cuts the 32x32 images into
            4x4 patches (8x8 feature maps): a quarter of the compute of a stride-2 stem,
            which a bench of 3 seeds and 8 targets on 2 CPU cores needs.
        source: the supervised multi-source training budget.
        adapt: the budget of every unsupervised adaptation method that trains.
        few: the budget of every few-label method that trains: norms at `lr`, heads at
            `lr_heads`, routes at `lr_routes` (the defaults that `select` scales).
        finetune_lr: the learning rate of few-label fine-tuning (every number it trains).
        select: choose each tuned method's learning rates on `dev_target` (`SELECTION_RULE`);
            off, every method runs at the defaults.
        dev_target: the development target whose labels choose the learning rates: an
            `mnistc` corruption that is neither a target nor a source.
        search: how the few-label `route_search` searches (its seed is the run's).
    """

    targets: list[str] = field(default_factory=lambda: DOMAINS + [f"mnistc/{c}" for c in DEFAULT_CORRUPTIONS])
    methods: list[str] = field(default_factory=lambda: list(ADAPT_METHODS))
    sources_train: bool = True
    few_label_methods: list[str] = field(default_factory=lambda: list(FEW_LABEL_METHODS))
    shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    few_label_targets: list[str] = field(default_factory=lambda: DOMAINS + [f"mnistc/{c}" for c in DEFAULT_CORRUPTIONS])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    regimes: list[str] = field(default_factory=lambda: [CONFIGURED])
    jobs: int = 1
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        in_channels=3, channels=32, num_modules=8, steps=8, stem_stride=4, route_init="permutation"))
    source: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=800, batch_size=128, lr=5e-3, lr_heads=5e-3, checkpoint_every=400, log_every=25))
    adapt: TrainConfig = field(default_factory=lambda: replace(ADAPT_TRAIN, steps=200))
    few: TrainConfig = field(default_factory=lambda: replace(ADAPT_TRAIN, steps=200, lr=1e-2, lr_heads=1e-2,
                                                              lr_routes=5e-2))
    finetune_lr: float = 1e-3
    search: SearchConfig = field(default_factory=lambda: SearchConfig(proxy="head"))
    select: bool = True
    dev_target: str = DEV_TARGET

    def __post_init__(self):
        check_choices("adaptation method", self.methods, ADAPT_METHODS)
        check_choices("few-label method", self.few_label_methods, FEW_LABEL_METHODS)
        check_choices("target", self.targets, self.domains + CORRUPTED)
        check_choices("few-label target", self.few_label_targets, self.domains + CORRUPTED)
        check_choices("source regime", self.regimes, (CONFIGURED, *REGIMES))
        check_choices("development target", [self.dev_target], CORRUPTED)
        if self.dev_target in self.targets + self.few_label_targets:
            raise IsomodError(f"the development target {self.dev_target} chooses learning rates with its labels; it "
                              "cannot also be a reported target: take another --dev-target or drop it from the targets")
        if any(k < 1 for k in self.shots):
            raise IsomodError(f"shots must be positive numbers of images per class, got {self.shots}")
        check_seeds(self.seeds)
        check_jobs(self.jobs)

    def shapes(self, regime: str) -> tuple[ModelConfig, TrainConfig]:
        """The model and source budget of a regime's source models."""
        return (self.model, self.source) if regime == CONFIGURED else REGIMES[regime].apply(self.model, self.source)


def left_out(target: str, domains: list[str]) -> str:
    """Name of the source model a target adapts from: the domain it leaves out, or `all`."""
    return short(target) if target in domains else "all"


@functools.lru_cache(maxsize=None)
def domain_data(name: str) -> TaskData:
    """A domain's data, read once per process."""
    return load_task(name)


def source_dir(out: Path, target: str, domains: list[str], seed: int, regime: str = CONFIGURED) -> Path:
    tag = "" if regime == CONFIGURED else f"{regime}-"
    return out / f"sources-{tag}{left_out(target, domains)}-s{seed}"


def plan(ctx: Context):
    """Per seed, in turn (a stopped run has whole seeds to show), four stages: the source
    models (one per regime and left-out domain, reloaded when complete); the selection runs
    on the development target (`select`); every analysis row and every method of every
    setting on every target, at the learning rates selection chose; then `route_oracle`,
    which starts from the best source route in hindsight (an analysis row of stage three).
    Rows already in the results are not planned again."""
    config = ctx.config
    every = {}
    for seed in config.seeds:
        runs = [(r, seed, target, [d for d in config.domains if d != target]) for r in config.regimes
                for target in dict.fromkeys(config.targets + config.few_label_targets)]
        models = {}
        for r, _, target, sources in runs:
            models.setdefault(source_dir(ctx.out, target, config.domains, seed, r), (r, sources, seed))
        every.update(models)
        yield [Job(train_sources, (run_dir, sources, *config.shapes(r), seed, ctx.progress),
                   lambda results, out, run_dir=run_dir, r=r, runs=runs: record_sources(ctx, runs, out, run_dir, r))
               for run_dir, (r, sources, seed) in models.items()]
        if config.select:
            yield [job for run_dir, (r, sources, seed) in models.items()
                   for job in selection_jobs(ctx, run_dir, r, sources, seed)]
        record_selection(ctx, every)
        yield [job for r, seed, target, sources in runs for job in adaptation_jobs(ctx, r, seed, target, sources)]
        yield [Job(oracle_run, (source_dir(ctx.out, target, config.domains, seed, r), target, sources,
                                best_source(ctx.results.rows, target, seed, r), replace(config.adapt, seed=seed),
                                r, ctx.progress), lambda results, out: record_oracle(results, out))
               for r, seed, target, sources in runs
               if target in config.targets and not ctx.results.has(method=ORACLE, task=target, seed=seed, regime=r)]


def record_sources(ctx: Context, runs: list, output, run_dir: Path, regime: str) -> None:
    accs, seconds, routes = output
    # The first run's training time stays: a rerun only reloads the checkpoint.
    ctx.results["source_models"].setdefault(run_dir.name.removeprefix("sources-"), {"test_acc": accs,
                                                                                    "seconds": seconds})
    for r, seed, target, sources in runs:
        if r == regime and source_dir(ctx.out, target, ctx.config.domains, seed, r) == run_dir:
            routes_of(ctx.results, r, target, seed)["sources"] = routes


def routes_of(results, regime: str, target: str, seed: int) -> dict:
    return results["routes"].setdefault(regime, {}).setdefault(f"{short(target)}-s{seed}", {})


def tuned_methods(config: AdaptBenchConfig) -> list[tuple[str, int | None]]:
    """The (method, shots) pairs selection runs: the unsupervised methods that train (shots
    None), then the few-label ones at the largest shot count."""
    return ([(m, None) for m in config.methods if ADAPT[m].tunes]
            + [(m, max(config.shots)) for m in config.few_label_methods if ADAPT[m].tunes])


def model_key(run_dir: Path) -> str:
    """A source model's name in selection rows: its left-out domain (or `all`) and regime."""
    return run_dir.name.removeprefix("sources-").rsplit("-s", 1)[0]


def tuned(config: AdaptBenchConfig, method: str, shots: int | None, factor: float, seed: int
          ) -> tuple[TrainConfig, dict]:
    """The budget and options of `method` with the learning rates it tunes scaled by `factor`."""
    train = replace(config.few if shots is not None else config.adapt, seed=seed)
    options = few_label_options(config, method, seed) if shots is not None else {}
    rates = ADAPT[method].tunes
    train = replace(train, **{f: getattr(train, f) * factor for f in rates if f != "finetune_lr"})
    if "finetune_lr" in rates:
        options["finetune_lr"] = config.finetune_lr * factor
    return train, options


def selection_jobs(ctx: Context, run_dir: Path, regime: str, sources: list[str], seed: int) -> list[Job]:
    """Every tuned method at every factor on the development target from one source model,
    as selection rows."""
    config, results = ctx.config, ctx.results
    dev, model = config.dev_target, model_key(run_dir)
    record = lambda results, out: record_method(ctx, out)  # noqa: E731
    jobs = []
    for method, shots in tuned_methods(config):
        for factor in FACTORS:
            if results.has(method=method, task=dev, seed=seed, regime=regime, shots=shots, factor=factor,
                           model=model, selection=True):
                continue
            train, options = tuned(config, method, shots, factor, seed)
            jobs.append(Job(method_run, (run_dir, dev, sources, method, train, regime, options, shots, ctx.progress,
                                         {"selection": True, "factor": factor, "model": model}), record))
    return jobs


def chosen_factor(ctx: Context, run_dir: Path, regime: str, seed: int, method: str) -> float | None:
    """The factor selection chose for `method` from the source model in `run_dir` (None: not
    tuned, or selection is off)."""
    if not ctx.config.select or not ADAPT[method].tunes:
        return None
    model = model_key(run_dir)
    dev = {r["factor"]: r["value"] for r in ctx.results.rows
           if r.get("selection") and r["method"] == method and r["seed"] == seed and r.get("regime") == regime
           and r.get("model") == model}
    missing = [f for f in FACTORS if f not in dev]
    if missing:
        raise IsomodError(f"selection of {method} (model {model}, seed {seed}) lacks its development runs at factors "
                          f"{missing}")
    return max(FACTORS, key=dev.__getitem__)


def record_selection(ctx: Context, models: dict) -> None:
    """`results.json`'s `selection`: the rule, the grid and every choice."""
    config = ctx.config
    if not config.select:
        ctx.results["selection"].update(rule="none: every method at the bench's default learning rates")
        return
    chosen = {f"{model_key(run_dir)}/{m}/s{seed}": chosen_factor(ctx, run_dir, r, seed, m)
              for run_dir, (r, sources, seed) in models.items() for m, _ in tuned_methods(config)}
    ctx.results["selection"].update(
        rule=SELECTION_RULE.format(dev=config.dev_target, shots=max(config.shots)), dev_target=config.dev_target,
        factors=list(FACTORS), tunes={m: list(ADAPT[m].tunes) for m, _ in tuned_methods(config)},
        chosen={**ctx.results["selection"].get("chosen", {}), **chosen})


def adaptation_jobs(ctx: Context, regime: str, seed: int, target: str, sources: list[str]) -> list[Job]:
    """The analysis rows, unsupervised methods (and their sources-training variants) and
    few-label methods of one target, seed and regime that the results lack."""
    config, results = ctx.config, ctx.results
    run_dir = source_dir(ctx.out, target, config.domains, seed, regime)
    common = {"task": target, "seed": seed, "regime": regime}
    record = lambda results, out: record_method(ctx, out)  # noqa: E731
    jobs = []
    if target in config.targets:
        jobs += [Job(analysis_rows, (run_dir, target, s, seed, regime), lambda results, rows: results.add(*rows))
                 for s in sources if not results.has(method=ANALYSIS[0], source=s, **common)]
        variants = [(m, False) for m in config.methods]
        variants += [(m, True) for m in config.methods if config.sources_train and m in ALIGN_ROUTE_METHODS]
        for m, st in variants:
            if not results.has(method=ADAPT[m].row, source=None, shots=None, sources_train=True if st else None,
                               **common):
                jobs.append(tuned_job(ctx, run_dir, target, sources, m, regime, seed, None,
                                      {"sources_train": True} if st else {}))
    if target in config.few_label_targets:
        jobs += [tuned_job(ctx, run_dir, target, sources, m, regime, seed, k)
                 for k in config.shots for m in config.few_label_methods
                 if not results.has(method=m, shots=k, setting="few_labels", **common)]
    return jobs


def tuned_job(ctx: Context, run_dir: Path, target: str, sources: list[str], method: str, regime: str, seed: int,
              shots: int | None, more: dict | None = None) -> Job:
    """`method` on `target` at the learning rates selection chose for it (its row carries the factor)."""
    factor = chosen_factor(ctx, run_dir, regime, seed, method)
    train, options = tuned(ctx.config, method, shots, 1.0 if factor is None else factor, seed)
    return Job(method_run, (run_dir, target, sources, method, train, regime, {**options, **(more or {})}, shots,
                            ctx.progress, {} if factor is None else {"factor": factor}),
               lambda results, out: record_method(ctx, out))


def few_label_options(config: AdaptBenchConfig, method: str, seed: int) -> dict:
    if ADAPT[method].searches:
        return {"search": replace(config.search, seed=seed)}
    return {"finetune_lr": config.finetune_lr} if "finetune_lr" in ADAPT[method].tunes else {}


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


def analysis_rows(run_dir: Path, target: str, source: str, seed: int, regime: str) -> list[Row]:
    """`source_only_each` and `adabn_each` of one source route on one target."""
    base, tgt = load_sources(run_dir), domain_data(target)
    rows = []
    for name in ANALYSIS:
        model = copy.deepcopy(base)
        add_as_copy(model, tgt.spec, source)
        if name == "adabn_each":
            model.estimate_stats(tgt.x_train, target)
        acc = evaluate(model, {target: tgt})[target]
        rows.append(_row(name, target, acc, model.param_count(), 0, seed, source=source, regime=regime))
    return rows


def method_run(run_dir: Path, target: str, sources: list[str], method: str, config: TrainConfig, regime: str,
               options: dict, shots: int | None, progress: bool, fields: dict | None = None
               ) -> tuple[Row, dict | None, float]:
    """One adaptation method on one target (with `shots` labelled images per class in the
    few-label setting): its row (with `fields` added), its route (route methods) and seconds."""
    name, tgt = ADAPT[method].row if shots is None else method, domain_data(target)
    if progress:
        print(f"== {regime}: {name}{' (sources train)' if options.get('sources_train') else ''} -> {short(target)}"
              f"{f', {shots} labels a class' if shots else ''} (seed {config.seed})", flush=True)
    t0 = time.time()
    model = load_sources(run_dir)
    labelled = few_shot(tgt, shots, seed=config.seed) if shots is not None else None
    res = adapt(model, tgt, method, config, progress=progress, source_data={s: domain_data(s) for s in sources},
                labelled=labelled, **options)
    acc = evaluate(model, {target: tgt})[target]  # the only place the target's test labels are read
    seconds = round(time.time() - t0, 1)
    extra, route = {"regime": regime, **(fields or {})}, None
    if shots is not None:
        extra.update(setting="few_labels", shots=shots)
    if ADAPT[method].routes:
        extra.update(route_accuracies(model, tgt, acc, res.soft_route))
    if res.soft_route is not None and not model.route(target).is_discrete:
        route = {"discrete": model.route(target).indices(), "soft": res.soft_route}
    if res.history and "align" in res.history[0]:
        extra["align_first"], extra["align_last"] = res.history[0]["align"], res.history[-1]["align"]
    if method in ROUTE_METHODS:
        route = {"discrete": model.route(target).indices(), "soft_at_discretize": res.soft_route, "kept": res.kept}
    extra.update({k: v for k, v in res.info.items() if k != "calibration"})
    if "calibration" in res.info:
        extra["calibration"] = res.info["calibration"]
    row = _row(name, target, acc, model.param_count(), res.params_task, config.seed, chosen=res.source,
               score=res.score, scores=res.scores, **extra)
    return row, route, seconds


def record_method(ctx: Context, output: tuple[Row, dict | None, float]) -> None:
    row, route, seconds = output
    f = row.fields
    variant = "+sources" if f.get("sources_train") else f"/{f['shots']}" if "shots" in f else ""
    key = f"{short(row.task)}-s{f['seed']}" + (f"@{f['factor']:.3g}" if f.get("selection") else "")
    ctx.results["seconds"][f"{f['regime']}/{row.method}{variant}/{key}"] = seconds
    ctx.results.add(row)
    if route is not None and not f.get("selection"):
        routes_of(ctx.results, f["regime"], row.task, f["seed"])[row.method + variant] = route


def best_source(rows: list[dict], target: str, seed: int, regime: str) -> str:
    return next(r["source"] for r in hindsight_rows([r for r in rows if r.get("regime") == regime])
                if r["task"] == target and r["seed"] == seed)


def oracle_run(run_dir: Path, target: str, sources: list[str], start: str, config: TrainConfig, regime: str,
               progress: bool) -> tuple[Row, dict]:
    if progress:
        print(f"== {regime}: {ORACLE} -> {short(target)} (seed {config.seed}, from {short(start)})", flush=True)
    row, route = oracle_row(load_sources(run_dir), domain_data(target), sources, start, config, progress)
    row.fields["regime"] = regime
    return row, route


def record_oracle(results, output: tuple[Row, dict]) -> None:
    row, route = output
    results.add(row)
    routes_of(results, row.fields["regime"], row.task, row.fields["seed"])[ORACLE] = route


def oracle_row(base: ModularNet, target: TaskData, sources: list[str], start: str, config: TrainConfig,
               progress: bool) -> tuple[Row, dict]:
    """`route_oracle`'s result row (test accuracy soft and discretised, the training loss
    over the first and last fifth) and its route."""
    model, trainer, changed = route_oracle(base, target, sources, start, config, progress)
    name = target.spec.name
    acc_discretized, discrete = discretized(model, target)
    losses = [h["loss"] for h in trainer.history]
    fifth = max(1, len(losses) // 5)
    acc = evaluate(model, {name: target})[name]
    row = _row(ORACLE, name, acc, model.param_count(), changed, config.seed, chosen=start, route_form="soft",
               acc_soft=round(acc, 5), acc_discretized=acc_discretized, loss_first_fifth=round(float(np.mean(losses[:fifth])), 5),
               loss_last_fifth=round(float(np.mean(losses[-fifth:])), 5))
    return row, {"discrete": discrete, "soft": model.route(name).weights().detach().cpu().tolist()}


def _row(method: str, task: str, acc: float, params_total: int, params_task: int, seed: int, **extra) -> Row:
    # The analysis rows (one fixed source route, with or without target statistics) and
    # `source_only_best` read the target's images at most: source-free.
    # `route_oracle` reads the target's labels to train.
    mode = setting(method) if method in ADAPT_METHODS else "target_labels" if method == ORACLE else "source_free"
    return Row(method, task, "test_acc", round(acc, 5), {"setting": extra.pop("setting", mode),
                                                         "params_total": params_total, "params_task": params_task,
                                                         "seed": seed, **extra})


def migrate(results: dict) -> dict:
    """An older `results.json` of this bench in today's names: renamed methods (`formerly`
    in the registry) and `configured`, once `default`, for the bench's own model configs."""
    methods, regimes = ADAPT.renamed(), {"default": CONFIGURED}
    out = dict(results)
    out["rows"] = [{**r, "method": renamed(r["method"], methods),
                    **({"regime": renamed(r["regime"], regimes)} if "regime" in r else {})}
                   if isinstance(r, dict) and "method" in r else r for r in results["rows"]]
    if isinstance(results.get("config"), dict):
        config = dict(results["config"])
        for key in ("methods", "few_label_methods"):
            if key in config:
                config[key] = renamed(config[key], methods)
        if "regimes" in config:
            config["regimes"] = renamed(config["regimes"], regimes)
        out["config"] = config
    if isinstance(results.get("routes"), dict):
        out["routes"] = {renamed(k, regimes): v for k, v in results["routes"].items()}
    selection = results.get("selection")
    if isinstance(selection, dict):
        selection = dict(selection)
        if isinstance(selection.get("tunes"), dict):
            selection["tunes"] = {renamed(k, methods): v for k, v in selection["tunes"].items()}
        if isinstance(selection.get("chosen"), dict):  # keys `model/method/sSEED`
            selection["chosen"] = {"/".join(renamed(part, methods) if i == 1 else part
                                            for i, part in enumerate(k.split("/"))): v
                                   for k, v in selection["chosen"].items()}
        out["selection"] = selection
    return out


BENCH = register(Bench("adapt", "unsupervised multi-source domain adaptation on digits5 (leave one domain out) and "
                       "MNIST-C style targets: route methods vs source-only, AdaBN and TENT (source-free), and vs "
                       "M3SDA and DANN (with sources)", AdaptBenchConfig, plan, write_report, summary,
                       unprefixed="adapt", device=lambda c: c.source.device,
                       extra=("source_models", "routes", "seconds", "selection"),
                       extensible=("targets", "methods", "few_label_methods", "shots", "few_label_targets", "seeds",
                                   "regimes"),
                       hidden=("source.seed", "adapt.seed", "few.seed", "search.seed"), migrate=migrate))
run = BENCH.run
