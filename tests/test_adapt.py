"""digits5, domains sharing a head, and unsupervised domain adaptation (`isomod.methods.adapt`)."""

import copy
from dataclasses import replace
import hashlib
import json

import numpy as np
import pytest
import torch

from isomod import load_checkpoint, save_checkpoint
from isomod.cli import main
from isomod.data import digits5
from isomod.data.tasks import TaskData, load_task
from isomod.errors import IsomodError
from isomod.core.network import ModularNet, TaskSpec
from isomod.training.trainer import TrainConfig, Trainer, evaluate
from isomod.methods.adapt import (ADAPT, ADAPT_METHODS, ALIGN_ROUTE_METHODS, FULL_NETWORK_METHODS, MIN_TARGET_IMAGES,
                          WITH_SOURCES, add_as_copy, adapt, setting, stats_distance)
from isomod.data import mnistc

from conftest import QUICK_ADAPT, SMALL


def digest(x: np.ndarray) -> set[str]:
    return {hashlib.sha1(img.tobytes()).hexdigest() for img in x}


@pytest.mark.parametrize("domain", digits5.DOMAINS)
def test_digits5_domains_are_32x32_rgb_ten_classes_with_disjoint_splits(domain):
    arrays = digits5.generate(domain)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32) and len(x) == len(y)
        assert sorted(np.unique(y)) == list(range(10))
    assert not digest(arrays["x_train"]) & digest(arrays["x_test"])
    task = load_task(f"digits5/{domain}")
    assert task.spec.label_space == "digits5" and task.spec.input_shape == (3, 32, 32)


def test_digits5_generation_is_deterministic():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = digits5.make_street("test", g1), digits5.make_street("test", g2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert digits5.make_street("test", torch.Generator().manual_seed(4))[0].tobytes() != a[0].tobytes()


def test_domains_share_one_head_and_it_survives_a_checkpoint(tmp_path):
    model = ModularNet(SMALL, [TaskSpec("a", 10, (3, 32, 32), label_space="d"), TaskSpec("b", 10, (3, 32, 32), label_space="d"),
                               TaskSpec("own", 4, (3, 32, 32))])
    assert model.head_of("a") is model.head_of("b") is model.heads["d"]
    assert model.branch("a").head is None and model.head_of("own") is model.branch("own").head
    assert model.task_param_count("a") == model.task_param_count("own") - model.head_of("own").weight.numel() - 4
    with pytest.raises(IsomodError, match="label space 'd'.*has 10"):
        model.add_task(TaskSpec("c", 5, (3, 32, 32), label_space="d"))
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck").eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x, "b"), model.eval()(x, "b"))
    model.remove_task("a")
    assert "d" in model.heads
    model.remove_task("b")
    assert "d" not in model.heads


def test_estimate_norm_stats_is_the_target_mean(sources_model, domains):
    model = copy.deepcopy(sources_model)
    target = domains["uci"]
    add_as_copy(model, target.spec, "digits5/mnist")
    assert stats_distance(model, target.name, "digits5/mnist") == 0.0
    x = target.x_train[:100]
    model.estimate_stats(x, target.name, batch_size=100)
    with torch.no_grad():
        h = model.stem(x.float() / 255)  # what the first norm sees
    assert torch.allclose(model.branch(target.name).norms[0].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert stats_distance(model, target.name, "digits5/mnist") > 0.0


def source_data(domains) -> dict[str, TaskData]:
    return {d.name: d for d in (domains["mnist"], domains["synth"])}


SOFT_AT_THE_END = ALIGN_ROUTE_METHODS + ("route_shot",)


@pytest.mark.parametrize("method", [m for m in ADAPT_METHODS if m != "route_calibrated"])  # that one: 3 sources
def test_adaptation_never_reads_target_labels_and_changes_nothing_shared(sources_model, domains, method):
    # Except m3sda and dann, which train the whole network on the sources' labels.
    target = domains["uci"]
    g = torch.Generator().manual_seed(1)
    shuffled = TaskData(target.spec, target.x_train, target.y_train[torch.randperm(len(target.y_train), generator=g)],
                        target.x_test, target.y_test[torch.randperm(len(target.y_test), generator=g)])
    states = []
    for data in (target, shuffled):
        model = copy.deepcopy(sources_model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        res = adapt(model, data, method, QUICK_ADAPT, progress=False, source_data=source_data(domains))
        after = model.state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        assert unchanged == (method not in FULL_NETWORK_METHODS), "a shared or source parameter changed (or did not)"
        assert model.route(target.name).is_discrete == (method not in SOFT_AT_THE_END)
        assert res.source in sources_model.task_names and res.setting == setting(method)
        assert not any(p.requires_grad for p in model.parameters())
        states.append(after)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_alignment_with_sources_lowers_its_loss_and_changes_only_the_route_and_statistics(sources_model, domains):
    target = domains["uci"]
    config = replace(QUICK_ADAPT, steps=60, batch_size=64, log_every=5)
    for method in ("route_moment", "m3sda"):
        model = copy.deepcopy(sources_model)
        res = adapt(model, target, method, config, progress=False, source_data=source_data(domains))
        align = [h["align"] for h in res.history]
        # The route alone moves a few module weights (measured: 1.90 -> 1.84); the whole network far more.
        drop = 0.98 if method == "route_moment" else 0.8
        assert len(align) == 12 and np.mean(align[-3:]) < drop * np.mean(align[:3]), (method, align)
        if method == "m3sda":
            assert all("ce" in h for h in res.history)
            assert res.params_task > model.param_count() // 2  # the whole network moved
    for method in ALIGN_ROUTE_METHODS:
        model = copy.deepcopy(sources_model)
        res = adapt(model, target, method, config, progress=False, source_data=source_data(domains))
        route, norms = model.route(target.name), model.branch(target.name).norms
        stats = sum(b.numel() for n, b in norms.named_buffers() if "running" in n)
        # Logits, statistics and the route's temperature (the source's annealed one, back to 1); nothing else.
        assert res.params_task == route.logits.numel() + stats + 1
        assert res.params_task < 0.1 * model.param_count()
        assert np.allclose(np.asarray(res.soft_route).sum(1), 1.0) and len(res.soft_route) == route.steps
        if method == "route_adversarial":
            assert all(0.0 <= h["domain_acc"] <= 1.0 for h in res.history)


def test_route_oracle_trains_the_target_route_alone_on_the_target_labels(sources_model, domains):
    from isomod.methods.adapt import route_oracle

    target = domains["uci"]
    g = torch.Generator().manual_seed(1)
    shuffled = TaskData(target.spec, target.x_train, target.y_train[torch.randperm(len(target.y_train), generator=g)],
                        target.x_test, target.y_test)
    before = {k: v.clone() for k, v in sources_model.state_dict().items()}
    logits = []
    for data in (target, shuffled):
        model, trainer, changed = route_oracle(sources_model, data, ["digits5/mnist", "digits5/synth"],
                                               "digits5/synth", replace(QUICK_ADAPT, steps=20, batch_size=64))
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "a shared or source number changed"
        route, norms = model.route(target.name), model.branch(target.name).norms
        assert not route.is_discrete and not any(p.requires_grad for p in model.parameters())
        # Logits, statistics and the temperature (the source's annealed one, back to 1).
        assert changed == route.logits.numel() + sum(b.numel() for n, b in norms.named_buffers() if "running" in n) + 1
        logits.append(route.logits.clone())
    assert not torch.equal(*logits), "the oracle's route does not depend on the target's labels"


def test_adaptation_with_sources_needs_their_data(sources_model, domains):
    model = copy.deepcopy(sources_model)
    for method in WITH_SOURCES:
        with pytest.raises(IsomodError, match="labelled source domains; their data is missing for digits5/synth"):
            adapt(model, domains["uci"], method, QUICK_ADAPT, progress=False, source_data={"digits5/mnist": domains["mnist"]})
    assert model.task_names == sources_model.task_names


@pytest.mark.parametrize("corruption", mnistc.CORRUPTIONS)
def test_mnistc_domains_corrupt_digits5_mnist_deterministically(corruption):
    clean = digits5.generate("mnist")
    arrays = mnistc.generate(corruption)
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        assert x.dtype == np.uint8 and x.shape == clean[f"x_{split}"].shape
        assert np.array_equal(arrays[f"y_{split}"], clean[f"y_{split}"])  # same labels, same split
        differs = (x != clean[f"x_{split}"]).reshape(len(x), -1).any(1)
        assert differs.mean() > 0.95, f"{corruption}: {differs.mean():.2f} of the images changed"
    x = torch.from_numpy(clean["x_test"][:50, 0]).float() / 255
    a = mnistc.corrupt(corruption, x, torch.Generator().manual_seed(5))
    b = mnistc.corrupt(corruption, x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    task = load_task(f"mnistc/{corruption}")
    assert task.spec.label_space == "digits5" and task.spec.input_shape == (3, 32, 32)


def test_adaptation_is_above_chance_and_adabn_helps_on_a_shifted_domain(sources_model, domains):
    target = domains["uci"]
    accs = {}
    for method in ("source_only", "adabn", "route_select"):
        model = copy.deepcopy(sources_model)
        adapt(model, target, method, QUICK_ADAPT, progress=False)
        accs[method] = evaluate(model, {target.name: target})[target.name]
    # Measured: source-only 35%, AdaBN and route_select 59% (chance 10%).
    assert accs["adabn"] > 0.3 and accs["route_select"] > 0.3 and accs["adabn"] > accs["source_only"] + 0.1, accs


def test_adaptation_errors(sources_model, domains):
    model = copy.deepcopy(sources_model)
    with pytest.raises(IsomodError, match="already a domain of this model"):
        adapt(model, domains["mnist"], "adabn", progress=False)
    t = domains["uci"]
    five = TaskData(TaskSpec("digits5/five", 5, (3, 32, 32), label_space="digits5"), t.x_train, t.y_train % 5,
                    t.x_test, t.y_test % 5)
    with pytest.raises(IsomodError, match="has 5 classes; the source domains"):
        adapt(model, five, "adabn", progress=False)
    few = TaskData(t.spec, t.x_train[: MIN_TARGET_IMAGES - 1], t.y_train[: MIN_TARGET_IMAGES - 1], t.x_test, t.y_test)
    with pytest.raises(IsomodError, match=f"needs at least {MIN_TARGET_IMAGES}"):
        adapt(model, few, "adabn", progress=False)
    alone = TaskData(TaskSpec("mine", 10, (3, 32, 32)), t.x_train, t.y_train, t.x_test, t.y_test)
    with pytest.raises(IsomodError, match="no label space"):
        adapt(model, alone, "adabn", progress=False)
    with pytest.raises(IsomodError, match="unknown adaptation method"):
        adapt(model, t, "magic", progress=False)
    assert model.task_names == sources_model.task_names


def test_route_only_training_stops_once_routes_are_discrete(domains):
    # With only route logits trainable, the steps after discretising train nothing; the
    # trainer used to crash there (a loss with no gradient).
    task = domains["mnist"]
    model = ModularNet(SMALL, [task.spec])
    model.requires_grad_(False)
    model.route(task.name).logits.requires_grad_(True)
    trainer = Trainer(model, [task], TrainConfig(steps=6, batch_size=16, warmup_steps=1, discretize_at=0.5,
                                                 checkpoint_every=0), progress=False)
    trainer.fit()
    assert trainer.step == 6 and model.route(task.name).is_discrete


# Every method runs in the tests above; the bench's contract needs one of each kind.
BENCH_METHODS = ["source_only", "adabn", "route_select", "route_im", "route_moment", "route_adversarial", "m3sda"]


@pytest.mark.slow
def test_adapt_and_bench_adapt_cli(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "adapt", "--out", str(out), "--targets", "digits5/uci", "mnistc/rotate", "--seeds", "0",
            "--domains", "digits5/mnist", "digits5/synth", "digits5/uci",
            "--model-channels", "8",
            "--model-num-modules", "3", "--model-steps", "3", "--source-steps", "10", "--source-batch-size", "32",
            "--steps", "6", "--batch-size", "32", "--no-progress", "--shots", "2", "--few-label-targets", "digits5/uci",
            "--few-steps", "4", "--search-max-candidates", "6", "--methods", *BENCH_METHODS,
            "--few-label-methods", "route", "route_search", "norm_patch", "adabn"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    dev = [r for r in results["rows"] if r.get("selection")]
    rows = [r for r in results["rows"] if not r.get("selection")]
    # selection: every tuned method at every factor on the development target, which is never reported
    # selection: every tuned method at every factor on the development target, from each source model
    tuned = [m for m in BENCH_METHODS if ADAPT[m].tunes] + ["route", "norm_patch"]
    assert {r["task"] for r in dev} == {"mnistc/motion_blur"} and len(dev) == 2 * 3 * len(tuned)
    assert {r["model"] for r in dev} == {"uci", "all"} and {r["shots"] for r in dev if "shots" in r} == {2}
    sel = results["selection"]
    assert sel["dev_target"] == "mnistc/motion_blur" and "development-target accuracy" in sel["rule"]
    for r in rows:
        if r["method"] in ADAPT and ADAPT[r["method"]].tunes:  # the factor its source model's development runs chose
            model = "uci" if r["task"] == "digits5/uci" else "all"
            at = {d["factor"]: d["value"] for d in dev if d["method"] == r["method"] and d["model"] == model}
            assert r["factor"] == sel["chosen"][f"{model}/{r['method']}/s0"] and at[r["factor"]] == max(at.values())
        else:
            assert "factor" not in r, r["method"]
    unsupervised = [r for r in rows if r["setting"] != "few_labels"]
    expected = {"source_only_each", "adabn_each", "source_only_best", "route_oracle"} | set(BENCH_METHODS) - {"source_only"}
    assert {r["method"] for r in unsupervised} == expected
    assert {r["task"] for r in rows} == {"digits5/uci", "mnistc/rotate"} and all(r["metric"] == "test_acc" for r in rows)
    assert {r["setting"] for r in unsupervised if r["method"] in WITH_SOURCES} == {"with_sources"}
    assert {r["setting"] for r in unsupervised if r["method"] not in WITH_SOURCES + ("route_oracle",)} == {"source_free"}
    assert all(r["regime"] == "configured" for r in rows)
    trained = [r for r in unsupervised if r.get("sources_train")]
    assert sorted(r["method"] for r in trained) == sorted(2 * list(ALIGN_ROUTE_METHODS))
    few = [r for r in rows if r["setting"] == "few_labels"]
    assert {(r["method"], r["shots"], r["task"]) for r in few} == {
        (m, 2, "digits5/uci") for m in ("route", "route_search", "norm_patch", "adabn")}
    assert next(r for r in few if r["method"] == "route_search")["candidates"] <= 6
    oracle = [r for r in rows if r["method"] == "route_oracle"]
    assert len(oracle) == 2 and {r["setting"] for r in oracle} == {"target_labels"}
    for r in oracle:  # it starts from the best source route in hindsight
        best = max((b for b in rows if b["method"] == "adabn_each" and b["task"] == r["task"]), key=lambda b: b["value"])
        assert r["chosen"] == best["source"] and {"acc_discretized", "loss_last_fifth"} <= r.keys()
    each = [r for r in rows if r["method"] == "source_only_each"]
    assert len(each) == 2 + 3  # uci leaves itself out; the corruption adapts from all three domains
    # every route row reports its route soft and discretised
    for r in rows:
        if r["method"] in ADAPT and ADAPT[r["method"]].routes or r["method"] == "route_oracle":
            assert r["route_form"] in ("soft", "discrete") and "acc_discretized" in r, r["method"]
            assert r["route_form"] == "discrete" or r["acc_soft"] == r["value"]
            assert r["route_form"] == "soft" or r["acc_discretized"] == r["value"]
    assert all("acc_soft" in r for r in rows if r["method"] in ("route_im", "route", *ALIGN_ROUTE_METHODS))
    assert sorted(p.name for p in out.glob("sources-*")) == ["sources-all-s0", "sources-uci-s0"]
    for png in ("accuracy.png", "routes.png", "samples.png"):
        assert (out / png).stat().st_size > 0
    text = (out / "report.md").read_text()
    assert ": best " not in text  # no method is singled out by its test accuracy
    assert "| route_im | discrete | adabn |" in text and "| route | soft | norm_patch |" in text
    assert "Selection rule: learning rates by development-target accuracy" in text
    assert "| mnistc/motion_blur |" not in text and "| motion_blur |" not in text  # never reported
    assert "| route method | ended as | soft | discretised | runs |" in text
    # the numbers table holds the few-label methods at the shot count the run had (it once looked for 10 only)
    assert "few-label methods at 2 labelled images per class" in text and "| few_labels | route |" in text
    assert "### MNIST-C style targets" in text and "route_oracle, analysis" in text
    assert "### A few labelled target images per class" in text and "What each adapted number buys" in text
    assert (out / "numbers-configured.png").stat().st_size > 0
    n = len(results["rows"])
    assert main(argv) == 0  # a second run resumes: nothing new
    assert len(json.loads((out / "results.json").read_text())["rows"]) == n
    capsys.readouterr()
    ck = out / "sources-uci-s0" / "checkpoint"
    assert main(["adapt", "--from", str(ck), "--target", "digits5/uci", "--out", str(tmp_path / "a"), "--steps", "4",
                 "--batch-size", "32", "--method", "route_im", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "digits5/uci: route_im started from" in printed and "test acc" in printed
    adapted = load_checkpoint(tmp_path / "a" / "checkpoint")
    assert "digits5/uci" in adapted.task_names and adapted.route("digits5/uci").is_discrete
    assert main(["adapt", "--from", str(ck), "--target", "digits5/uci", "--out", str(tmp_path / "m"), "--steps", "4",
                 "--batch-size", "32", "--method", "route_moment", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "route_moment started from" in printed and "pool, stem, head and sources are unchanged" in printed
    assert not load_checkpoint(tmp_path / "m" / "checkpoint").route("digits5/uci").is_discrete
    assert main(["adapt", "--from", str(ck), "--target", "digits5/mnist", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 2
    assert "already a domain of this model" in capsys.readouterr().err


def test_a_learned_route_that_scores_worse_than_its_start_is_undone(sources_model, domains, monkeypatch):
    from isomod.methods.adapt import base, source_free

    # IM scores: the two source routes (choosing the start), the start with target
    # statistics, then the learned route: worse than its start.
    calls = iter([-1.0, -0.5, -1.0, 0.0])
    for module in (base, source_free):
        monkeypatch.setattr(module, "im_score", lambda model, task, x: next(calls))
    model = copy.deepcopy(sources_model)
    res = adapt(model, domains["uci"], "route_im", QUICK_ADAPT, progress=False)
    assert res.kept is False
    assert model.route("digits5/uci").indices() == model.route(res.source).indices()


def test_transfer_trains_a_new_label_space_s_head_but_never_a_shared_one(sources_model, domains):
    from isomod.methods.transfer import prepare_route, transfer

    model = copy.deepcopy(sources_model)
    prepare_route(model, domains["uci"])  # a third domain: its head is the sources' head
    own = model.param_groups(["digits5/uci"])
    assert own["heads"] == [] and own["routes"] == [model.branch("digits5/uci").route.logits]
    t = domains["uci"]
    other = TaskData(TaskSpec("other/uci", 10, (3, 32, 32), label_space="other"), t.x_train, t.y_train, t.x_test, t.y_test)
    model = copy.deepcopy(sources_model)
    res = transfer(model, other, "route_only", replace(QUICK_ADAPT, steps=4), source="digits5/mnist", progress=False)
    head = model.head_of("other/uci")
    assert res.params_task == model.task_param_count("other/uci") + head.weight.numel() + head.bias.numel()


def test_route_moment_s_reference_moves_with_its_objective():
    """The nearest source's moments are buffers: `objective.to(...)` moves them with the bank
    (they were a plain tuple, left on the CPU when the Trainer moved the objective to CUDA)."""
    from isomod.methods.adapt.align import SourceAlignment

    bank = torch.randn(50, 8)
    objective = SourceAlignment("moment", ["s"], 16, 8, bank=bank).to(torch.float64)
    assert objective.ref_mean.dtype == objective.ref_second.dtype == objective.bank.dtype == torch.float64
    assert torch.allclose(objective.ref_mean, bank.double().mean(0))
    assert "ref_mean" not in objective.state_dict()  # derived from the bank, not saved
