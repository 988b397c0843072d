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

from isomod.bench.paired import INTERVAL, Paired, pair
from isomod.errors import IsomodError

UNITS = {("seed",): "seeds", ("task", "seed"): "(task, seed) pairs"}


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
        selection: how the compared configurations were chosen, without labels of a
            reported target (named beside the figure).
        where: row fields both sides must match (setting, shots, regime, ...).
        comparator_where: fields the comparator's rows must match instead of `where`'s
            (`None`: the same as the method's).
        unit: the row fields that name a unit of pairing.
        route: `soft` or `discrete`: which accuracy of a route row is read (`acc_soft`,
            `acc_discretized`); `-` for methods that return no route.
        metric: the rows' `metric`.
        registered: when the claim was registered (a hypothesis is registered before its
            run: the commit that adds it comes before the results).
    """

    name: str
    results: str
    method: str
    comparator: str
    target: float
    says: str
    selection: str
    where: dict = field(default_factory=dict)
    comparator_where: dict | None = None
    unit: tuple[str, ...] = ("task", "seed")
    route: str = "-"
    metric: str = "test_acc"
    registered: str = ""

    def rows(self, results: dict, method: str, where: dict) -> list[dict]:
        return [r for r in results["rows"] if r["method"] == method and r.get("metric") == self.metric
                and not r.get("selection") and all(r.get(k) == v for k, v in where.items())]

    def evaluate(self, results: dict) -> Paired:
        """The paired differences of `method` and `comparator` in `results`."""
        mine = self.rows(results, self.method, self.where)
        theirs = self.rows(results, self.comparator, self.where if self.comparator_where is None
                           else self.comparator_where)
        return pair(mine, theirs, self.unit, reader(self.route), reader(self.route))


def reader(route: str):
    """How a row's accuracy is read: a route row's `acc_soft` or `acc_discretized` (older rows
    without `route_form`: their value), any other row's `value`."""
    if route == "-":
        return lambda r: r["value"]
    field_name = "acc_soft" if route == "soft" else "acc_discretized"
    return lambda r: r.get(field_name) if "route_form" in r else r["value"]


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    paired: Paired

    @property
    def verdict(self) -> str:
        return self.paired.verdict(self.claim.target) if self.paired.n else "not measured"

    def cells(self) -> list[str]:
        c, p = self.claim, self.paired
        target = f"{c.target:+g}"
        if not p.n:
            return [c.name, f"{c.method} - {c.comparator}", c.route, target, "", "0", self.verdict]
        lo, hi = p.interval
        return [c.name, f"{c.method} - {c.comparator}", c.route, target, f"{p.mean:+.1f} [{lo:+.1f}, {hi:+.1f}]",
                str(p.n), f"**{self.verdict}**"]


ADAPT_FEW = "learning rates chosen on a development target never reported (mnistc/motion_blur); methods fixed in advance"
ADAPT_UNSUP = ("learning rates chosen on a development target never reported (mnistc/motion_blur); the source route "
               "each method starts from chosen by a label-free score; methods fixed in advance")
SEARCH = ("pools and methods fixed in advance; the route chosen by the search's proxy on the labelled training "
          "images; the source task by nearest-class-mean separation of the training images")

CLAIMS: tuple[Claim, ...] = (
    # --- adaptation (issue 30's targets), each soft and discrete ----------------------------------
    *(Claim(f"adapt-few10-route-adabn-{form}", "adapt", "route", "adabn", 5.0,
            f"with 10 labels a class, a route-only method ({form} route) beats AdaBN by at least 5 points",
            ADAPT_FEW, where={"setting": "few_labels", "shots": 10}, route=form) for form in ("soft", "discrete")),
    *(Claim(f"adapt-few10-route-normpatch-{form}", "adapt", "route", "norm_patch", 0.0,
            f"with 10 labels a class, a route-only method ({form} route) beats the norm patch",
            ADAPT_FEW, where={"setting": "few_labels", "shots": 10}, route=form) for form in ("soft", "discrete")),
    *(Claim(f"adapt-unsup-shot-adabn-{form}", "adapt", "route_shot", "adabn", 3.0,
            f"without labels, a route self-trained on pseudo-labels ({form} route) beats AdaBN by at least 3 points",
            ADAPT_UNSUP, where={"setting": "source_free"}, route=form) for form in ("soft", "discrete")),
    *(Claim(f"adapt-unsup-shot-tent-{form}", "adapt", "route_shot", "tent", 0.0,
            f"without labels, a route self-trained on pseudo-labels ({form} route) beats TENT",
            ADAPT_UNSUP, where={"setting": "source_free"}, route=form) for form in ("soft", "discrete")),
    # --- the registered transfer hypothesis: route search over a pool trained to work in any order --
    *(Claim(f"search-{regime}-{shots}-head", "transfer-search", "route_search", "head_only", 3.0,
            f"route search (a discrete route) over a `{regime}` pool beats a linear probe by at least 3 points "
            f"({shots} training images per class)", SEARCH, where={"regime": regime, "shots": shots},
            route="discrete", registered="2026-12-02, before its run")
      for regime in ("templates_swap", "random_routes") for shots in (10, "all")),
)


def registry() -> dict[str, Claim]:
    names = [c.name for c in CLAIMS]
    if len(set(names)) != len(names):
        raise IsomodError("two claims share a name")
    return {c.name: c for c in CLAIMS}


def evaluate(folder: str | Path, names: list[str] | None = None) -> list[Verdict]:
    """Every claim (or those named) evaluated on `folder/{results}.json`; a claim whose
    results file is missing is `not measured`."""
    from isomod.bench.base import read_results

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
        out.append(Verdict(c, c.evaluate(cache[c.results])))
    return out


def table(verdicts: list[Verdict]) -> str:
    """A markdown table of the verdicts."""
    lines = [f"| claim | comparison | route | target | mean difference (points), {INTERVAL} | units | verdict |",
             "|---|---|---|---:|---|---:|---|"]
    lines += ["| " + " | ".join(v.cells()) + " |" for v in verdicts]
    return "\n".join(lines)


def as_json(verdicts: list[Verdict]) -> str:
    return json.dumps([{"claim": v.claim.name, "verdict": v.verdict, "n": v.paired.n, "mean": v.paired.mean,
                        "interval": list(v.paired.interval), "target": v.claim.target} for v in verdicts], indent=1)
