"""Claims: paired differences with their interval, verdicts, the README generated from them,
and selection rules that read no label of a reported target."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from isomod.bench import claims
from isomod.bench.claims import Claim
from isomod.bench.paired import pair, t_interval
from isomod.cli import main
from isomod.errors import IsomodError

ROOT = Path(__file__).parents[1]


def test_the_t_interval_of_a_known_sample():
    # mean 3, sample sd sqrt(2.5), n 5, t(0.975, 4) = 2.7764451: half-width 1.9632
    lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert lo == pytest.approx(1.036756, abs=1e-5) and hi == pytest.approx(4.963244, abs=1e-5)
    assert t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert t_interval([1.0]) == (-math.inf, math.inf)  # one unit: no spread to measure


def row(method, task, seed, value, **more):
    return {"method": method, "task": task, "seed": seed, "metric": "test_acc", "value": value, **more}


def test_pairs_are_formed_on_shared_units_only_and_refuse_two_rows_of_one_unit():
    a = [row("m", "t", s, 0.5 + 0.01 * s) for s in range(3)] + [row("m", "u", 0, 0.9)]
    b = [row("b", "t", s, 0.5) for s in range(3)] + [row("b", "v", 0, 0.1)]
    p = pair(a, b, ("task", "seed"), lambda r: r["value"], lambda r: r["value"])
    assert p.units == (("t", 0), ("t", 1), ("t", 2)) and p.diffs == pytest.approx((0.0, 1.0, 2.0))
    assert p.mean == pytest.approx(1.0) and p.n == 3
    with pytest.raises(ValueError, match="two first rows for the unit"):
        pair(a + [row("m", "t", 0, 0.1)], b, ("task", "seed"), lambda r: r["value"], lambda r: r["value"])


def claim_on(diffs, target, **kw):
    rows = [row("m", "t", s, 0.5 + d / 100) for s, d in enumerate(diffs)]
    rows += [row("b", "t", s, 0.5) for s in range(len(diffs))] + [row("m", "mean", 0, 1.0), row("b", "mean", 0, 0.0)]
    c = Claim("c", "x", "m", "b", target, "m beats b", "fixed", **kw)
    return c.verdict(c.evaluate({"rows": rows}))


def test_verdicts_met_not_met_and_undecided():
    assert claim_on([4.9, 5.0, 5.1], 3.0) == "met"
    assert claim_on([0.9, 1.0, 1.1], 3.0) == "not met"
    assert claim_on([-5.0, 3.0, 11.0], 3.0) == "undecided"
    assert claim_on([], 3.0) == "not measured"
    assert claim_on([1.0, 1.5, 2.0], 3.0, below=True) == "met"  # "at most 3 points"


def test_a_route_claim_reads_the_soft_or_the_discretised_accuracy():
    rows = [row("route", "t", s, 0.7, route_form="soft", acc_soft=0.7, acc_discretized=0.5) for s in range(3)]
    rows += [row("adabn", "t", s, 0.6) for s in range(3)]
    soft = Claim("s", "x", "route", "adabn", 0.0, "", "fixed", route="soft").evaluate({"rows": rows})
    hard = Claim("d", "x", "route", "adabn", 0.0, "", "fixed", route="discrete").evaluate({"rows": rows})
    assert soft.mean == pytest.approx(10.0) and hard.mean == pytest.approx(-10.0)


def test_every_claim_names_a_known_rule_route_and_results_file():
    names = claims.registry()
    assert len(names) == len(claims.CLAIMS)
    for c in claims.CLAIMS:
        assert c.selection in claims.RULES and c.route in ("-", "soft", "discrete"), c.name
        assert c.results in claims.ORDER, c.name
    # every route claim of the adaptation targets comes soft and discrete
    adapt = [c for c in claims.CLAIMS if c.results == "adapt"]
    assert {c.route for c in adapt} == {"soft", "discrete"}


def test_the_readme_summary_is_what_the_claims_give(tmp_path, capsys):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    assert main(["report", "--claims", str(ROOT / "docs" / "results"), "--readme", str(readme)]) == 0
    assert readme.read_text() == (ROOT / "README.md").read_text(), \
        "README.md's claims are stale: run `isomod report --claims --readme README.md`"
    printed = capsys.readouterr().out
    assert "| mtl-independent |" in printed and "95% t-interval over units" in printed
    assert main(["report", "--claims", str(ROOT / "docs" / "results"), "--json", "--names", "mtl-trunk"]) == 0
    [one] = json.loads(capsys.readouterr().out.split("\n", 0)[0])
    assert one["claim"] == "mtl-trunk" and one["n"] > 0 and len(one["interval"]) == 2
    assert main(["report", "--claims", "--names", "no-such-claim"]) == 2
    assert "unknown claim 'no-such-claim'" in capsys.readouterr().err
    (tmp_path / "plain.md").write_text("# nothing generated here\n")
    assert main(["report", "--claims", "--readme", str(tmp_path / "plain.md")]) == 2
    assert "has no claims block" in capsys.readouterr().err


@pytest.mark.slow
def test_a_twin_run_with_the_targets_labels_shuffled_makes_the_same_choices(tmp_path, monkeypatch, capsys):
    """Selection reads the development target's labels, never a reported target's: shuffling
    every label of the reported target changes no chosen learning rate and no chosen source."""
    from isomod.bench import adapt as bench_adapt

    real = bench_adapt.domain_data

    def shuffled(name):
        data = real(name)
        if name != "digits5/uci":
            return data
        g = torch.Generator().manual_seed(1)
        return type(data)(data.spec, data.x_train, data.y_train[torch.randperm(len(data.y_train), generator=g)],
                          data.x_test, data.y_test[torch.randperm(len(data.y_test), generator=g)])

    def run(out):
        argv = ["bench", "adapt", "--out", str(out), "--targets", "digits5/uci", "--seeds", "0",
                "--domains", "digits5/mnist", "digits5/synth", "digits5/uci", "--model-channels", "8",
                "--model-num-modules", "3", "--model-steps", "3", "--source-steps", "10", "--source-batch-size", "32",
                "--steps", "4", "--batch-size", "32", "--no-progress", "--shots", "2", "--few-label-targets",
                "digits5/uci", "--few-steps", "3", "--methods", "adabn", "route_select", "route_shot",
                "--few-label-methods", "route", "norm_patch", "--sources-train", "false"]
        assert main(argv) == 0
        return json.loads((out / "results.json").read_text())

    first = run(tmp_path / "a")
    monkeypatch.setattr(bench_adapt, "domain_data", shuffled)
    second = run(tmp_path / "b")
    assert first["selection"]["chosen"] == second["selection"]["chosen"]

    def choices(results):
        return {(r["method"], r.get("shots")): (r.get("chosen"), r.get("factor")) for r in results["rows"]
                if r["task"] == "digits5/uci" and r["method"] not in ("source_only_each", "adabn_each", "route_oracle")}

    assert choices(first) == choices(second) and len(choices(first)) == 5
    dev = [(r["method"], r.get("shots"), r["factor"], r["value"]) for r in first["rows"] if r.get("selection")]
    assert dev == [(r["method"], r.get("shots"), r["factor"], r["value"]) for r in second["rows"] if r.get("selection")]
    # the shuffled labels did reach the reported rows: the twin is not the same run
    oracle = [next(r["loss_last_fifth"] for r in res["rows"] if r["method"] == "route_oracle") for res in (first, second)]
    assert oracle[0] != oracle[1]  # route_oracle trains on the target's labels
