"""The adaptation settings beyond the source-free one (`isomod.methods.adapt.few_labels`,
`with_sources`, `select`): a few labelled target images, sources that keep training while the
route aligns, routes chosen by a calibrated label-free score."""

import copy
from dataclasses import replace

import pytest
import torch

from isomod.methods.adapt import ALIGN_ROUTE_METHODS, FEW_LABELS, adapt
from isomod.data.tasks import TaskData, load_task
from isomod.errors import IsomodError
from isomod.core.network import ModularNet
from isomod.methods.search import SearchConfig
from isomod.training.trainer import TrainConfig, Trainer

from conftest import QUICK_ADAPT, SMALL, subset


def source_data(domains) -> dict[str, TaskData]:
    return {d.name: d for d in (domains["mnist"], domains["synth"])}


def labelled_part(target: TaskData, shots: int) -> TaskData:
    from isomod.methods.transfer import few_shot

    return few_shot(target, shots, seed=0)


def without_labels(target: TaskData) -> TaskData:
    """The target with every label replaced: a method that read them would change."""
    return TaskData(target.spec, target.x_train, torch.full_like(target.y_train, 3), target.x_test,
                    torch.full_like(target.y_test, 3))


@pytest.mark.parametrize("method", FEW_LABELS)
def test_few_label_methods_read_only_the_labelled_images_and_keep_what_they_should(sources_model, domains, method):
    target = domains["uci"]
    labelled = labelled_part(target, 3)
    assert torch.bincount(labelled.y_train).tolist() == [3] * 10  # exactly 3 a class
    config = replace(QUICK_ADAPT, steps=6, lr=5e-2, lr_heads=5e-2)
    states = []
    for data in (target, without_labels(target)):
        model = copy.deepcopy(sources_model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        res = adapt(model, data, method, config, progress=False, labelled=labelled,
                    **({"search": SearchConfig(proxy="head", max_candidates=8)} if method == "route_search" else {}))
        after = model.state_dict()
        shared_changed = any(not torch.equal(before[k], after[k]) for k in before)
        assert shared_changed == (method == "finetune"), method
        assert res.setting == "few_labels" and res.params_task > 0
        assert (model.head_of(target.name) is model.heads["digits5"]) == (method not in ("head_only", "finetune"))
        states.append(after)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_few_label_methods_need_their_labelled_images(sources_model, domains):
    target = domains["uci"]
    with pytest.raises(IsomodError, match="needs some labelled images of 'digits5/uci'"):
        adapt(copy.deepcopy(sources_model), target, "route", progress=False)
    wrong = labelled_part(domains["synth"], 2)
    with pytest.raises(IsomodError, match="labelled images are of task 'digits5/synth'"):
        adapt(copy.deepcopy(sources_model), target, "route", progress=False, labelled=wrong)


@pytest.mark.parametrize("method", ALIGN_ROUTE_METHODS)
def test_sources_keep_training_while_the_route_aligns_and_no_target_label_is_read(sources_model, domains, method):
    target = domains["uci"]
    config = replace(QUICK_ADAPT, steps=8, batch_size=32)
    states = []
    for data in (target, without_labels(target)):
        model = copy.deepcopy(sources_model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        res = adapt(model, data, method, config, progress=False, source_data=source_data(domains), sources_train=True)
        after = model.state_dict()
        assert not torch.equal(before["pool.blocks.0.w1"], after["pool.blocks.0.w1"])  # the sources trained
        assert res.info["sources_train"] and res.params_task > res.info["target_numbers"] > 0
        assert all("ce" in h and "align" in h for h in res.history)
        assert not model.route(target.name).is_discrete
        states.append(after)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.fixture(scope="module")
def three_sources(domains):
    extra = subset(load_task("digits5/street"), 600, 300)
    sources = [domains["mnist"], domains["synth"], extra]
    torch.manual_seed(0)
    model = ModularNet(replace(SMALL, channels=8), [t.spec for t in sources])
    Trainer(model, sources, TrainConfig(steps=60, batch_size=32, lr=5e-3, lr_heads=5e-3, warmup_steps=5,
                                        checkpoint_every=0), progress=False).fit()
    return model.eval(), {t.name: t for t in sources}


def test_a_calibrated_route_comes_from_the_candidates_and_reads_no_target_label(three_sources, domains):
    from isomod.methods.adapt.select import SCORES, candidates

    base, sources = three_sources
    target = domains["uci"]
    routes = {c.route for c in candidates(base, list(sources))}
    assert len(routes) > 3
    states = []
    for data in (target, without_labels(target)):
        model = copy.deepcopy(base)
        res = adapt(model, data, "route_calibrated", QUICK_ADAPT, progress=False, source_data=sources)
        assert tuple(model.route(target.name).indices()) in routes and model.route(target.name).is_discrete
        assert set(res.info["calibration"]) == set(SCORES) and res.score in SCORES
        assert all(-1 <= v["spearman"] <= 1 and v["regret"] >= 0 for v in res.info["calibration"].values())
        assert model.task_names == base.task_names + [target.name]
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_calibrating_a_route_score_needs_three_sources(sources_model, domains):
    with pytest.raises(IsomodError, match="needs at least 3 source domains, the model has 2"):
        adapt(copy.deepcopy(sources_model), domains["uci"], "route_calibrated", QUICK_ADAPT, progress=False,
              source_data=source_data(domains))
