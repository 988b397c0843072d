"""Continual learning with a growing pool: earlier tasks keep their exact outputs, the pool
grows only when a route over the frozen pool falls short, and growth that does not help is
undone."""

import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, TrainConfig, load_checkpoint
from isomod.methods import continual
from isomod.methods.continual import GrowConfig, learn_task
from isomod.data.tasks import split_validation

from conftest import glyph_task

CFG = TrainConfig(steps=120, batch_size=32, lr=1e-2, lr_heads=1e-2, warmup_steps=5, checkpoint_every=0)


@pytest.fixture(scope="module")
def stream(digit_tasks):
    return [digit_tasks[1], glyph_task("hebrew"), digit_tasks[0]]


def probe(model, task):
    return model.eval()(task.x_test[:32].float() / 255, task.name)


def test_split_validation_is_stratified_and_disjoint():
    task = glyph_task("digits")
    fit = split_validation(task, 0.25, seed=3)
    assert torch.bincount(fit.y_test).tolist() == [15] * 10 and torch.bincount(fit.y_train).tolist() == [45] * 10
    rows = {tuple(x.flatten().tolist()) for x in fit.x_train}
    assert not rows & {tuple(x.flatten().tolist()) for x in fit.x_test}
    assert len(fit.y_train) + len(fit.y_test) == len(task.y_train)
    with pytest.raises(IsomodError, match="class 0 has 60 training images, too few to hold 100% out"):
        split_validation(task, 0.999)


def test_growing_stream_keeps_earlier_tasks_bit_identical(stream, tmp_path):
    torch.manual_seed(0)
    model = ModularNet(ModelConfig(channels=8, num_modules=2, steps=3))
    grow = GrowConfig(threshold=1.0, modules=2)  # every task after the first tries to grow
    outcomes, probes = [], {}
    for task in stream:
        outcomes.append(learn_task(model, task, CFG, grow, out_dir=tmp_path / task.name.replace("/", "_"),
                                   progress=False))
        probes[task.name] = probe(model, task)
        for earlier in stream[: len(probes)]:
            assert torch.equal(probes[earlier.name], probe(model, earlier)), earlier.name
        assert all(model.pool.frozen()) and not any(p.requires_grad for p in model.parameters())
    first, *rest = outcomes
    assert first.grew and first.modules_added == 2 and first.val_route is None
    assert len(model.pool) == 2 + sum(o.modules_added for o in rest)
    for o in rest:
        assert o.val_route is not None and o.val_grown is not None and o.steps == 2 * CFG.steps
        assert 0 <= o.modules_added <= 2 and o.grew == (o.modules_added > 0)
        assert o.val_grown > o.val_route or not o.grew
        assert 0.0 <= o.test_acc <= 1.0
    used = {m for name in model.task_names for m in model.route(name).indices()}
    assert set(range(2, len(model.pool))) <= used  # every module kept for a task is run by it
    assert outcomes[0].test_acc > 0.3  # UCI digits, chance 0.1
    loaded = load_checkpoint(tmp_path / stream[-1].name.replace("/", "_") / "checkpoint")
    assert loaded.pool.frozen() == [True] * len(model.pool)
    for task in stream:
        assert torch.equal(probes[task.name], probe(loaded, task))


def test_soft_routes_grow_and_keep_earlier_tasks_bit_identical(stream):
    """The template regime: soft routes over a pool that grows. Earlier routes give the
    fresh modules exactly zero weight and mix only their own modules, so their outputs stay
    bit-identical; a grown soft route keeps every fresh module."""
    from isomod.training.regimes import REGIMES

    model_cfg, cfg = REGIMES["templates"].apply(ModelConfig(channels=8, steps=4), CFG)
    torch.manual_seed(0)
    model = ModularNet(model_cfg)
    probes = {}
    for task in stream:
        outcome = learn_task(model, task, cfg, GrowConfig(threshold=1.0, modules=2), progress=False)
        assert not model.route(task.name).is_discrete
        if outcome.grew and probes:
            assert outcome.modules_added == 2
        probes[task.name] = probe(model, task)
        for earlier in stream[: len(probes)]:
            assert torch.equal(probes[earlier.name], probe(model, earlier)), earlier.name
    first_route = model.route(stream[0].name)
    assert first_route.support().tolist() == [0, 1] and first_route.weights()[:, 2:].max() == 0


def test_a_route_that_reaches_the_threshold_does_not_grow_the_pool(stream):
    torch.manual_seed(0)
    model = ModularNet(ModelConfig(channels=8, num_modules=2, steps=3))
    learn_task(model, stream[0], CFG, progress=False)
    outcome = learn_task(model, stream[1], CFG, GrowConfig(threshold=0.0), progress=False)
    assert not outcome.grew and outcome.val_grown is None and outcome.steps == CFG.steps and len(model.pool) == 2


def test_growth_that_does_not_help_is_undone(stream, monkeypatch):
    torch.manual_seed(0)
    model = ModularNet(ModelConfig(channels=8, num_modules=2, steps=3))
    learn_task(model, stream[0], CFG, progress=False)
    real = continual.Trainer

    class Hopeless(real):  # the grown run "scores" zero on validation
        def fit(self, resume=False):
            return {name: 0.0 for name in super().fit(resume)}

    seen = {}
    real_fit_route = continual.fit_route

    def spy(model, task, *args, **kwargs):
        out = real_fit_route(model, task, *args, **kwargs)
        seen["route"] = model.route(task.name).indices()
        seen["logits"] = probe(model, stream[1])
        return out

    monkeypatch.setattr(continual, "Trainer", Hopeless)
    monkeypatch.setattr(continual, "fit_route", spy)
    outcome = learn_task(model, stream[1], CFG, GrowConfig(threshold=1.0), progress=False)
    assert not outcome.grew and outcome.val_grown == 0.0 and len(model.pool) == 2
    assert outcome.route == seen["route"] == model.route(stream[1].name).indices()
    assert torch.equal(seen["logits"], probe(model, stream[1]))


def test_grow_config_errors():
    with pytest.raises(IsomodError, match="grow threshold must lie in"):
        GrowConfig(threshold=1.5)
    with pytest.raises(IsomodError, match="growing must add at least 1 module"):
        GrowConfig(modules=0)


def test_fresh_modules_the_grown_route_does_not_use_are_removed(stream, monkeypatch):
    torch.manual_seed(0)
    model = ModularNet(ModelConfig(channels=8, num_modules=2, steps=3))
    learn_task(model, stream[0], CFG, progress=False)
    seen = {}

    class OldModulesOnly(continual.Trainer):  # the grown run wins but routes around the fresh modules
        def fit(self, resume=False):
            super().fit(resume)
            (name,) = self.train_tasks
            self.model.route(name).set_choice([1, 0, 1])
            seen["logits"] = probe(self.model, stream[1])
            return {name: 1.0}

    monkeypatch.setattr(continual, "Trainer", OldModulesOnly)
    outcome = learn_task(model, stream[1], CFG, GrowConfig(threshold=1.0), progress=False)
    assert outcome.val_grown == 1.0 and not outcome.grew and outcome.modules_added == 0
    assert len(model.pool) == 2 and outcome.route == [1, 0, 1]
    assert torch.equal(seen["logits"], probe(model, stream[1]))


def test_the_final_table_of_an_unfinished_run_lists_each_method_s_own_seeds():
    from isomod.bench.continual import final_table

    stream = ["a", "b"]
    rows = [{"method": m, "task": t, "seed": s, "after_index": 2, "after_task": "b", "value": v,
             "params_total": 10}
            for m, seeds in (("grow", (0, 1)), ("alone", (0,))) for s in seeds
            for t, v in zip(stream, ((0.5, 0.7) if s == 0 else (0.9, 0.9)))]
    rows += [{**r, "after_index": 1, "after_task": "a"} for r in rows if r["task"] == "a"]
    results = {"config": {"task_names": stream, "methods": ["grow", "alone"]}, "rows": rows,
               "methods": {"grow": {"s0": {"steps": 4}, "s1": {"steps": 6}}, "alone": {"s0": {"steps": 4}}}}
    text = final_table(results)
    assert "| mean, each seed | 60.0 / 90.0 | 60.0 (seed 0) |" in text and "nan" not in text
    assert "| **mean** | **75.0** (75.0) | **60.0** (60.0) |" in text and "| training steps | 5 | 4 |" in text
