"""Claims as data: every comparison the README and the docs pages state, registered with its
bench, method and comparator, metric, unit of pairing, target difference, setting and the
rule that chose what it compares. `isomod report --claims` evaluates each on the committed
`docs/results/*.json`:

- the paired differences (points) of the method and its comparator on each unit the two
  share (a seed; a target and a seed; a task and a seed), their mean, a 95% t-interval over
  the units (`isomod.bench.paired`), and the number of units;
- a verdict: **met** when the interval lies above the target difference, **not met** when
  it lies below it, **undecided** when it spans it (or when no unit has been measured yet).

A route claim says whether it is about the soft route or its discrete argmax (`route`);
"re-ordering" means the discrete route. The README's summary table is generated from the
verdicts (`readme_block`), and a test regenerates it byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from isomod.bench.docs import md_table
from isomod.bench.paired import INTERVAL, Paired, pair
from isomod.errors import IsomodError

UNITS = {("seed",): "seeds", ("task", "seed"): "(task, seed)", ("N",): "pool sizes", ("round",): "rounds"}


@dataclass(frozen=True)
class Claim:
    """One registered comparison.

    Args:
        name: a short identifier (`isomod report --claims NAME`).
        results: the results file's stem: `docs/results/{results}.json`.
        method: the method claimed for (rows' `method`).
        comparator: what it is compared with.
        target: the difference (points) the interval must clear: `0` for "above",
            `3` for "by at least 3 points", `-1` for "within 1 point".
        says: the sentence the README states when the claim holds.
        selection: the key of the rule (`RULES`) that chose what is compared, without
            labels of a reported target (named beside the figure).
        where: row fields both sides must match (setting, shots, regime, ...).
        comparator_where: fields the comparator's rows must match instead of `where`'s
            (`None`: the same as the method's).
        unit: the row fields that name a unit of pairing.
        route: `soft` or `discrete`: which accuracy of a route row is read (`acc_soft`,
            `acc_discretized`); `-` for methods that return no route.
        metric: the rows' `metric`.
        registered: when the claim was registered (a hypothesis is registered before its
            run: the commit that adds it comes before the results).
        planned: the units its bench's full grid gives (0: whatever the results hold); a
            claim read on fewer says so.
    """

    name: str
    results: str
    method: str
    comparator: str | None
    target: float
    says: str
    selection: str
    where: dict = field(default_factory=dict)
    comparator_where: dict | None = None
    unit: tuple[str, ...] = ("task", "seed")
    route: str = "-"
    metric: str = "test_acc"
    comparator_metric: str | None = None
    below: bool = False
    scale: float = 100.0
    registered: str = ""
    planned: int = 0

    def rows(self, results: dict, method: str, metric: str, where: dict) -> list[dict]:
        return [r for r in results["rows"] if r["method"] == method and r.get("metric") == metric
                and r.get("task") != "mean" and not r.get("selection") and all(r.get(k) == v for k, v in where.items())]

    def evaluate(self, results: dict) -> Paired:
        """The paired differences of `method` and `comparator` in `results` (or, without a
        comparator, the method's values themselves), times `scale`."""
        mine = self.rows(results, self.method, self.metric, self.where)
        if self.comparator is None:
            return pair(mine, mine, self.unit, reader(self.route), lambda r: 0.0, self.scale)
        theirs = self.rows(results, self.comparator, self.comparator_metric or self.metric,
                           self.where if self.comparator_where is None else self.comparator_where)
        return pair(mine, theirs, self.unit, reader(self.route), reader(self.route), self.scale)

    def verdict(self, paired: Paired) -> str:
        if not paired.n:
            return "not measured"
        verdict = paired.verdict(self.target)
        return {"met": "not met", "not met": "met"}.get(verdict, verdict) if self.below else verdict

    @property
    def comparison(self) -> str:
        mine = self.method if self.route == "-" else f"{self.method} ({self.route})"
        if self.comparator is None:
            return f"{mine}: {self.metric}"
        if self.comparator_metric:
            return f"{mine} {self.metric} - {self.comparator} {self.comparator_metric}"
        return f"{mine} - {self.comparator}"


def reader(route: str):
    """How a row's accuracy is read: a route row's `acc_soft` or `acc_discretized` (None where
    it was not measured), any other row's `value`. Rows from before `route_form` read their
    value as soft, and as discrete unless it was a learned soft route's (an older transfer
    row with `route_steps_changed` and no search `candidates`: not measured)."""
    if route == "-":
        return lambda r: r["value"]
    if route == "discrete":
        def discrete(r: dict) -> float | None:
            if "acc_discretized" in r:
                return r["acc_discretized"]
            return None if "route_steps_changed" in r and "candidates" not in r else r["value"]
        return discrete
    return lambda r: r.get("acc_soft") if "route_form" in r else r["value"]


@dataclass(frozen=True)
class Verdict:
    """A claim evaluated: its paired differences and the selection rule its results file
    records (a results file made before its bench had a rule names `defaults`)."""

    claim: Claim
    paired: Paired
    selection: str

    @property
    def verdict(self) -> str:
        return self.claim.verdict(self.paired)

    @property
    def figure(self) -> str:
        """`+1.2 [-0.3, +2.7]` (ratios and other unscaled values with more digits)."""
        if not self.paired.n:
            return ""
        lo, hi = self.paired.interval
        f = ".1f" if self.claim.scale == 100 else ".3f"
        return f"{self.paired.mean:+{f}} [{lo:+{f}}, {hi:+{f}}]"

    def cells(self) -> list[str]:
        c = self.claim
        target = ("<= " if c.below else ">= ") + f"{c.target:+g}"
        return [c.name, c.comparison, target, self.figure, str(self.paired.n), f"**{self.verdict}**"]


RULES = {
    "fixed": "methods, budget and tasks fixed in advance; nothing chosen among runs",
    "dev-target": "methods fixed in advance; learning rates chosen on a development target that is never reported "
                  "(mnistc/motion_blur); each method's source route chosen by a label-free score",
    "source-ncm": "methods fixed in advance; the source task chosen by nearest-class-mean separation of the new task's "
                  "training images; the bench's default learning rates",
    "search-proxy": "as source-ncm; the route chosen by the search's proxy on the labelled training images",
    "validation": "validation images held out of each task's training split; no test image read",
    "same-run": "timed in one run against the plain network of the same run",
    "defaults": "the bench's default learning rates, set in earlier sessions partly with labels of MNIST-M, a "
                "reported target: an analysis figure until the bench re-runs with its selection rule",
}
ADAPT_FEW = ADAPT_UNSUP = "dev-target"
FIXED, TRANSFER, SEARCH, REGIMES_RULE, SPEED = "fixed", "source-ncm", "search-proxy", "validation", "same-run"


def _reuse(results: str, method: str, says: str) -> Claim:
    return Claim(f"{results}-{method}-once", results, method, "once", 0.0, says, FIXED, where={"L": 8},
                 comparator_where={"L": 4}, unit=("seed",))


CLAIMS: tuple[Claim, ...] = (
    # --- multi-task learning ------------------------------------------------------------------------
    # the bench's full budget, 10,000 steps (`mtl` holds the 2,000-step run)
    Claim("mtl-independent", "mtl-10k", "modular", "independent", -1.0,
          "a shared pool is within 1 point of independent networks at about a quarter of their parameters", FIXED,
          planned=24),
    Claim("mtl-trunk", "mtl-10k", "modular", "shared_trunk", 3.0,
          "a shared pool beats a shared trunk by at least 3 points", FIXED, planned=24),
    Claim("mtl-shuffled", "mtl-10k", "modular", "modular", -10.0,
          "a task's modules keep their accuracy (within 10 points) when its route is shuffled", FIXED,
          metric="shuffled_acc", comparator_metric="test_acc", planned=24),
    Claim("mtl-transformer-independent", "mtl-transformer", "modular", "independent", -1.0,
          "a pool of transformer blocks is within 1 point of independent ViTs", FIXED),
    Claim("mtl-transformer-trunk", "mtl-transformer", "modular", "shared_trunk", 3.0,
          "a pool of transformer blocks beats a shared ViT trunk by at least 3 points", FIXED),
    *(Claim(f"regimes-annealed-{other}", "mtl-regimes", "modular", f"modular_{other}", 0.0,
            f"the default regime (annealed) beats `{other}` on validation accuracy", REGIMES_RULE, metric="val_acc")
      for other in ("annealed_swap", "templates_swap")),
    # --- transfer to a new task -----------------------------------------------------------------
    *(Claim(f"transfer-route-head-{shots}" + ("" if form == "soft" else "-discrete"), "transfer", "route_head",
            "head_only", 3.0, f"a learned route ({form}) adds at least 3 points to a linear probe ({shots} images per "
            "class)", TRANSFER, where={"shots": shots}, route=form, planned=15)
      for shots in (10, "all") for form in ("soft", "discrete")),
    *(Claim(f"transfer-search-head-{shots}", "transfer", "route_search", "head_only", 3.0,
            f"a searched route adds at least 3 points to a linear probe ({shots} images per class)", SEARCH,
            where={"shots": shots}, route="discrete", planned=15) for shots in (10, "all")),
    Claim("transfer-norms-head-all", "transfer", "norm_head", "head_only", 3.0,
          "new step norms add at least 3 points to a linear probe (all images)", TRANSFER, where={"shots": "all"},
          planned=15),
    *(Claim("transfer-route-norms-all" + ("" if form == "soft" else "-discrete"), "transfer", "route_only",
            "norm_head", 0.0, f"a learned route ({form}) adds to new step norms (all images)", TRANSFER,
            where={"shots": "all"}, route=form, planned=15) for form in ("soft", "discrete")),
    Claim("transfer-transformer-route-head", "transfer-transformer", "route_head", "head_only", 3.0,
          "over transformer blocks, a learned route adds at least 3 points to a linear probe (all images)", TRANSFER,
          where={"shots": "all"}, route="soft"),
    # --- the registered transfer hypothesis: route search over a pool trained to work in any order --
    *(Claim(f"search-{regime}-{shots}", "transfer-search", "route_search", "head_only", 3.0,
            f"route search over a `{regime}` pool beats a linear probe by at least 3 points ({shots} images per "
            "class)", SEARCH, where={"regime": regime, "shots": shots}, route="discrete",
            registered="2026-12-02, before its run", planned=15)
      for regime in ("templates_swap", "random_routes") for shots in (10, "all")),
    # --- domain adaptation, each route soft and discrete ------------------------------------------
    *(Claim(f"adapt-few10-route-adabn-{form}", "adapt", "route", "adabn", 5.0,
            f"with 10 labels a class, a route-only method ({form} route) beats AdaBN by at least 5 points",
            ADAPT_FEW, where={"setting": "few_labels", "shots": 10}, route=form, planned=24)
      for form in ("soft", "discrete")),
    *(Claim(f"adapt-few10-route-normpatch-{form}", "adapt", "route", "norm_patch", 0.0,
            f"with 10 labels a class, a route-only method ({form} route) beats the norm patch",
            ADAPT_FEW, where={"setting": "few_labels", "shots": 10}, route=form, planned=24)
      for form in ("soft", "discrete")),
    *(Claim(f"adapt-unsup-shot-adabn-{form}", "adapt", "route_shot", "adabn", 3.0,
            f"without labels, a route self-trained on pseudo-labels ({form} route) beats AdaBN by at least 3 points",
            ADAPT_UNSUP, where={"setting": "source_free"}, route=form, planned=24)
      for form in ("soft", "discrete")),
    *(Claim(f"adapt-unsup-shot-tent-{form}", "adapt", "route_shot", "tent", 0.0,
            f"without labels, a route self-trained on pseudo-labels ({form} route) beats TENT",
            ADAPT_UNSUP, where={"setting": "source_free"}, route=form, planned=24)
      for form in ("soft", "discrete")),
    # --- continual learning and block reuse -------------------------------------------------------
    Claim("continual-independent", "continual", "modular_grow", "independent", -1.0,
          "a growing pool is within 1 point of independent networks at the end of the stream", FIXED,
          where={"after_index": 10}),
    *(_reuse("reuse", m, f"running {m} routes over 4 modules at 8 steps beats running each once")
      for m in ("cyclic", "block_repeat", "learned", "templates")),
    _reuse("reuse", "distinct", "8 distinct modules beat 4 run once"),
    *(_reuse("reuse-transformer", m, f"over transformer blocks, {m} routes over 4 modules at 8 steps beat running "
             "each once") for m in ("cyclic", "block_repeat", "learned")),
    # --- serving several tasks from one batch -------------------------------------------------------
    *(Claim(f"serve-mixed-8-{threads}thread", "serve", "mixed", None, 0.9,
            f"a batch mixing 8 tasks runs at least 0.9 times as fast as one task's batch ({threads} thread"
            f"{'s' if threads > 1 else ''}, uniform)", SPEED,
            where={"tasks": 8, "distribution": "uniform", "threads": threads}, unit=("round",),
            metric="mixed_to_single", scale=1.0, planned=9) for threads in (1, 2)),
    # --- cost -------------------------------------------------------------------------------------
    *(Claim(f"speed-{block}-{tasks}task", results, "weight_mixing", None, 1.1,
            f"a routed training step ({block} pool, {tasks} task{'s' if tasks > 1 else ''} per step) costs at most "
            "1.1 times a plain network's", SPEED, where={"tasks": tasks}, unit=("N",),
            metric="train_time_ratio_to_plain", below=True, scale=1.0)
      for results, block, tasks in (("speed", "conv", 1), ("speed", "conv", 8), ("speed-transformer", "transformer", 1))),
    Claim("speed-conv-8task-grouped", "speed", "grouped", None, 1.05,
          "with the step's 8 tasks as one forward pass (group_tasks), a routed training step costs at most 1.05 "
          "times a plain network's", SPEED, where={"tasks": 8}, unit=("N",), metric="train_time_ratio_to_plain",
          below=True, scale=1.0, registered="2026-12-02, before its run (issue 32's target)"),
)


def registry() -> dict[str, Claim]:
    names = [c.name for c in CLAIMS]
    if len(set(names)) != len(names):
        raise IsomodError("two claims share a name")
    return {c.name: c for c in CLAIMS}


def evaluate(folder: str | Path, names: list[str] | None = None) -> list[Verdict]:
    """Every claim (or those named) evaluated on `folder/{results}.json`; a claim whose
    results file is missing is `not measured`."""
    from isomod.bench.results import read_results

    claims = registry()
    unknown = [n for n in names or [] if n not in claims]
    if unknown:
        raise IsomodError(f"unknown claim {unknown[0]!r}; registered: {', '.join(claims)}")
    cache: dict[str, dict] = {}
    out = []
    for c in (claims[n] for n in names) if names else claims.values():
        path = Path(folder) / f"{c.results}.json"
        if c.results not in cache:
            cache[c.results] = read_results(path) if path.is_file() else {"rows": []}
        results = cache[c.results]
        rule = c.selection
        if rule == "dev-target" and results["rows"] and not (results.get("selection") or {}).get("rule"):
            rule = "defaults"
        out.append(Verdict(c, c.evaluate(results), rule))
    return out


def table(verdicts: list[Verdict]) -> str:
    """A markdown table of the verdicts."""
    return "\n".join(md_table(["claim", "comparison", "target", f"mean difference (points), {INTERVAL}", "units",
                               "verdict"], [v.cells() for v in verdicts], "llrlrl"))


def as_json(verdicts: list[Verdict]) -> str:
    return json.dumps([{"claim": v.claim.name, "verdict": v.verdict, "n": v.paired.n, "mean": v.paired.mean,
                        "interval": list(v.paired.interval), "target": v.claim.target, "selection": v.selection}
                       for v in verdicts], indent=1)


README_BEGIN, README_END = "<!-- isomod claims: begin -->", "<!-- isomod claims: end -->"
ORDER = ("mtl-10k", "mtl", "mtl-transformer", "mtl-regimes", "transfer", "transfer-transformer", "transfer-search", "adapt",
         "continual", "reuse", "reuse-transformer", "speed", "speed-transformer", "serve")


def readme_block(verdicts: list[Verdict]) -> str:
    """The README's summary: every claim with its paired difference, interval, units,
    verdict and selection rule, by results file; then the route claims about discrete routes,
    what re-ordering buys."""
    lines = [README_BEGIN, "Generated by `isomod report --claims --readme README.md` from the committed "
             "`docs/results/*.json`; each claim is registered in `isomod.bench.claims`.", ""]
    rank = {name: i for i, name in enumerate(ORDER)}
    body = []
    for v in sorted(verdicts, key=lambda v: rank.get(v.claim.results, len(ORDER))):
        c = v.claim
        units = f"{v.paired.n}{f' of {c.planned}' if c.planned else ''} {UNITS.get(c.unit, ', '.join(c.unit))}"
        body.append([f"[{c.results}](docs/results/{c.results}.md)", f"{c.says} (`{c.comparison}`, "
                     f"{'at most' if c.below else 'at least'} {c.target:+g})", v.figure, units, f"**{v.verdict}**",
                     v.selection])
    lines += md_table(["results", "claim", f"difference, {INTERVAL}", "units", "verdict", "selection"], body, "lllrll")
    used = dict.fromkeys(v.selection for v in verdicts)
    lines += ["", "Selection rules: " + "; ".join(f"`{k}`: {RULES[k]}" for k in used) + ".", ""]
    routes = [v for v in verdicts if v.claim.route == "discrete"]
    if routes:
        lines += ["**What re-ordering buys, as measured** (re-ordering: a discrete route, one module per step): "
                  + "; ".join(f"{v.claim.says}: {v.verdict}" + (f" ({v.figure} points)" if v.paired.n else "")
                              for v in routes) + "."]
    return "\n".join(lines + [README_END])


def write_readme(path: str | Path, block: str) -> None:
    """Replace the README's generated claims block (between the markers)."""
    from isomod.files import write_atomic

    path = Path(path)
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise IsomodError(f"{path} has no claims block: add the lines {README_BEGIN} and {README_END} where it goes")
    head, rest = text.split(README_BEGIN, 1)
    text = head + block + rest.split(README_END, 1)[1]
    write_atomic(path, lambda f: f.write(text.encode()))
