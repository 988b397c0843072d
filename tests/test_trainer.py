"""Tiny training runs: learning above chance, resume, divergence, schedules."""

import math
from dataclasses import replace

import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, TaskSpec, TrainConfig, Trainer, TrainingDiverged, evaluate
from isomod.training.route_schedule import RouteSchedule
from isomod.training.trainer import route_schedule
from isomod.io.checkpoint import load_checkpoint

from test_checkpoint import snapshot


def tiny_model(tasks, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(channels=16, num_modules=4, steps=4, **kw)
    return ModularNet(cfg, [t.spec for t in tasks])


def quick(**kw):
    base = dict(steps=160, batch_size=32, lr=5e-3, lr_heads=5e-3, warmup_steps=10, log_every=10,
                checkpoint_every=0, discretize_at=0.75)
    return TrainConfig(**{**base, **kw})


def test_two_task_run_learns_well_above_chance(digit_tasks, tmp_path):
    two_tasks = digit_tasks
    model = tiny_model(two_tasks)
    trainer = Trainer(model, two_tasks, quick(steps=300), out_dir=tmp_path, progress=False)
    accs = trainer.fit()
    for name, acc in accs.items():
        assert acc > 0.5, (name, acc)  # chance is 0.1
    assert all(model.route(n).is_discrete for n in model.task_names)
    assert trainer.soft_usage is not None and len(trainer.soft_usage) == 2
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()
    assert (tmp_path / "log.jsonl").read_text().count('"step"') >= 16
    loaded = load_checkpoint(tmp_path / "checkpoint")
    assert evaluate(loaded, two_tasks) == accs


def test_resume_after_a_crash_matches_an_uninterrupted_run(two_tasks, tmp_path):
    cfg = quick(steps=30, checkpoint_every=10, discretize_at=0.5, log_every=5)
    full = tiny_model(two_tasks)
    Trainer(full, two_tasks, cfg, out_dir=tmp_path / "full", progress=False).fit()

    calls = {"n": 0}

    def crashing(model, x, y, task):
        calls["n"] += 1
        if calls["n"] == 24:
            raise KeyboardInterrupt  # a killed run, after the step-20 checkpoint
        from isomod.training.trainer import cross_entropy
        return cross_entropy(model, x, y, task)

    broken = tiny_model(two_tasks)
    with pytest.raises(KeyboardInterrupt):
        Trainer(broken, two_tasks, cfg, out_dir=tmp_path / "run", objective=crashing, progress=False).fit()
    resumed = tiny_model(two_tasks, seed=123)  # a fresh process: weights come from the checkpoint
    trainer = Trainer(resumed, two_tasks, cfg, out_dir=tmp_path / "run", progress=False)
    trainer.fit(resume=True)
    assert trainer.step == 30
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_and_keeps_last_good_checkpoint(two_tasks, tmp_path):
    cfg = quick(steps=20, checkpoint_every=5)

    def poisoned(model, x, y, task):
        from isomod.training.trainer import cross_entropy
        loss, logits = cross_entropy(model, x, y, task)
        return (loss * float("nan") if trainer.step >= 12 else loss), logits

    model = tiny_model(two_tasks)
    trainer = Trainer(model, two_tasks, cfg, out_dir=tmp_path, objective=poisoned, progress=False)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 12 .* last good checkpoint: .*checkpoint"):
        trainer.fit()
    ck = tmp_path / "checkpoint"
    assert '"step": 10' in (ck / "config.json").read_text()
    before = snapshot(ck)
    load_checkpoint(ck)
    assert snapshot(ck) == before


def test_resume_refuses_an_incompatible_checkpoint(two_tasks, tmp_path):
    from isomod import CheckpointError

    Trainer(tiny_model(two_tasks), two_tasks, quick(steps=4), out_dir=tmp_path, progress=False).fit()
    before = snapshot(tmp_path / "checkpoint")
    torch.manual_seed(0)
    other = ModularNet(ModelConfig(channels=8, num_modules=4, steps=4), [t.spec for t in two_tasks])
    with pytest.raises(CheckpointError, match="channels: 16 in checkpoint vs 8"):
        Trainer(other, two_tasks, quick(steps=8), out_dir=tmp_path, progress=False).fit(resume=True)
    assert snapshot(tmp_path / "checkpoint") == before


def model_route():
    from isomod.core.route import Route

    return Route(3, 2, init="flat")


def test_schedules_and_temperature():
    cfg = TrainConfig(steps=100, warmup_steps=10, temperature_start=1.0, temperature_end=0.01, discretize_at=0.5)
    assert cfg.lr_factor(0) == pytest.approx(0.1)
    assert cfg.lr_factor(10) == pytest.approx(1.0)
    assert cfg.lr_factor(99) < 0.01
    routes = route_schedule(cfg)
    assert routes == RouteSchedule(100, 1.0, 0.01, 0.01, 0.5, 0.0)
    assert routes.temperature(0) == 1.0 and routes.temperature(50) == pytest.approx(0.01)
    assert routes.temperature(25) == pytest.approx(0.1) and routes.discretize_step == 50
    never = RouteSchedule(steps=100, discretize_at=1.0, temperature_end=0.01)
    assert never.discretize_step is None and never.temperature(50) == pytest.approx(0.1)
    soft = route_schedule(TrainConfig(routes="soft", route_swap=0.25))
    assert soft == RouteSchedule.soft(swap=0.25)
    assert soft.discretize_step is None and soft.temperature(99) == 1.0
    assert soft.penalty(0, [model_route()]) is None and routes.penalty(0, []) is None
    step = TrainConfig(steps=100, warmup_steps=0, schedule="step")
    assert [step.lr_factor(s) for s in (0, 60, 90)] == pytest.approx([1.0, 0.1, 0.01])


def test_proportional_sampling_and_several_tasks_per_step(two_tasks):
    model = tiny_model(two_tasks)
    trainer = Trainer(model, two_tasks, quick(steps=6, tasks_per_step=2, sampling="proportional"), progress=False)
    trainer.fit()
    assert set(trainer.history[-1]["train_acc"]) == {t.name for t in two_tasks}
    assert math.isfinite(trainer.history[-1]["loss"])


def test_frozen_pool_trains_only_routes_norms_heads(two_tasks):
    model = tiny_model(two_tasks)
    model.freeze_shared()
    pool_before = [b.w1.clone() for b in model.pool.blocks]
    stem_before = model.stem.weight.clone()
    Trainer(model, two_tasks, quick(steps=5), progress=False).fit()
    assert all(torch.equal(a, b.w1) for a, b in zip(pool_before, model.pool.blocks))
    assert torch.equal(stem_before, model.stem.weight)


def test_training_one_task_leaves_other_routes_soft_and_untouched(two_tasks):
    model = tiny_model(two_tasks)
    other = two_tasks[1].name
    logits = model.route(other).logits.detach().clone()
    Trainer(model, two_tasks, quick(steps=8, discretize_at=0.5), progress=False, train_tasks=[two_tasks[0].name]).fit()
    assert model.route(two_tasks[0].name).is_discrete
    assert not model.route(other).is_discrete
    assert torch.equal(model.route(other).logits, logits)
    assert model.route(other).temperature.item() == 1.0


def test_bf16_autocast_and_compiled_forward_train_the_model_itself(digit_tasks, tmp_path):
    task = digit_tasks[1]
    model = tiny_model([task])
    trainer = Trainer(model, [task], quick(steps=120, precision="bf16", compile="aot_eager"), out_dir=tmp_path,
                      progress=False)
    accs = trainer.fit()
    assert accs[task.name] > 0.4  # chance is 0.1; the route was discretised mid-run under compile
    assert model.route(task.name).is_discrete
    assert evaluate(load_checkpoint(tmp_path / "checkpoint"), [task]) == accs
    with pytest.raises(Exception, match="unknown precision 'fp8'; known: fp32, bf16"):
        TrainConfig(precision="fp8")


def test_tensorboard_events_hold_the_scalars_and_route_images(two_tasks, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_model(two_tasks)
    Trainer(model, two_tasks, quick(steps=12, log_every=4, eval_every=8), out_dir=tmp_path, progress=False).fit()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    names = [t.name for t in two_tasks]
    assert {"loss", "lr", "temperature", *(f"train_acc/{n}" for n in names), *(f"test_acc/{n}" for n in names)} <= tags
    assert [e.step for e in events.Scalars("loss")] == [4, 8, 12]
    assert [e.step for e in events.Scalars(f"test_acc/{names[0]}")] == [8, 12]
    final = evaluate(model, two_tasks)[names[0]]
    assert events.Scalars(f"test_acc/{names[0]}")[-1].value == pytest.approx(final)
    assert {f"route/{n}" for n in names} <= set(events.Tags()["images"])


def test_progress_without_a_terminal_prints_a_few_plain_lines(two_tasks, capsys):
    Trainer(tiny_model(two_tasks), two_tasks, quick(steps=40, log_every=5), progress=True).fit()
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("train: step")]
    assert len(lines) == 20 and lines[-1].startswith("train: step 40/40 (100%)")
    assert "\r" not in out.out + out.err and "loss" in lines[-1]


def test_regimes_set_pool_route_start_and_schedule():
    from isomod.training.regimes import REGIMES, regime

    base_model, base_train = ModelConfig(steps=8), TrainConfig(lr=3e-3, lr_routes=0.05)
    model, train = REGIMES["annealed"].apply(base_model, base_train)
    assert (model.num_modules, model.route_init, train.routes, train.lr_routes) == (16, "cyclic", "annealed", 0.05)
    model, train = REGIMES["templates"].apply(base_model, base_train)
    assert (model.num_modules, model.route_init, model.route_init_scale) == (4, "flat", 1.1)
    assert train.routes == "soft" and train.lr_routes == 3e-3 and model.norm_affine == "step"
    assert REGIMES["templates_norms"].apply(base_model, base_train)[0].norm_affine == "module"
    assert REGIMES["templates_swap"].apply(base_model, base_train)[1].route_swap == 0.5
    assert REGIMES["templates"].apply(base_model, base_train, modules=3)[0].num_modules == 3
    model, train = REGIMES["templates_permuted_swap"].apply(base_model, base_train)
    assert (model.num_modules, model.route_init, train.routes, train.route_swap) == (4, "permutation", "soft", 0.5)
    assert REGIMES["templates_permuted"].apply(base_model, base_train)[1].route_swap == 0.0
    # Every task starts on its own order of the 4 templates, each at 2 of the 8 steps.
    torch.manual_seed(0)
    specs = [TaskSpec(f"t{i}", 3, (1, 8, 8)) for i in range(6)]
    net = ModularNet(replace(model, channels=4), specs)
    starts = {tuple(net.route(s.name).indices()) for s in specs}
    assert len(starts) > 1 and all(sorted(r) == [0, 0, 1, 1, 2, 2, 3, 3] and r[:4] == r[4:] for r in starts)
    # Over transformer blocks the annealed regimes start nearer one module; convolution blocks keep scale 1.
    vit = replace(base_model, block="transformer")
    assert [REGIMES[r].apply(vit, base_train)[0].route_init_scale for r in ("annealed", "annealed_swap")] == [4.0, 4.0]
    assert REGIMES["annealed_swap"].apply(base_model, base_train)[0].route_init_scale == 1.0
    assert REGIMES["annealed_swap"].apply(base_model, base_train)[1].route_swap == 0.5
    assert REGIMES["templates"].apply(vit, base_train)[0].route_init_scale == 1.1
    with pytest.raises(IsomodError, match="unknown route regime 'loops'; known: annealed, templates"):
        regime("loops")


def test_route_swap_exchanges_two_steps_and_still_trains_the_route(two_tasks):
    model = tiny_model(two_tasks, route_init="flat")
    task = two_tasks[0].name
    x = torch.rand(4, 1, 28, 28)
    order = torch.tensor([0, 3, 2, 1])
    route = model.route(task)
    mixed = model.mixed_params(route, order)
    assert all(torch.equal(mixed[k], model.mixed_params(route)[k][order]) for k in mixed)
    mixed["w1"][1].sum().backward()  # step 1 runs step 3's mixture: only step 3's logits get a gradient
    assert route.logits.grad[3].abs().sum() > 0 and route.logits.grad[[0, 1, 2]].abs().sum() == 0
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x, task, step_order=order), model(x, task)), "exchanging steps changed nothing"
    # In training, about `route_swap` of the batches run with two steps exchanged.
    seen = []

    def watching(model, x, y, task):
        from isomod.training.trainer import StepOrder, cross_entropy
        seen.append(model.override["step_order"].tolist() if isinstance(model, StepOrder) else None)
        return cross_entropy(model, x, y, task)

    model = tiny_model(two_tasks, route_init="flat")
    Trainer(model, two_tasks, quick(steps=200, routes="soft", route_swap=0.5), objective=watching,
            progress=False).fit()
    swaps = [o for o in seen if o is not None]
    assert 60 < len(swaps) < 140
    assert all(sorted(o) == [0, 1, 2, 3] and sum(a != b for a, b in enumerate(o)) == 2 for o in swaps)
    with pytest.raises(IsomodError, match="route_swap must lie in"):
        TrainConfig(route_swap=1.5)


def test_only_trained_routes_are_annealed_and_discretised(two_tasks):
    """A soft route that is run but not trained keeps its weights and temperature."""
    model = tiny_model(two_tasks, route_init="flat")
    frozen = model.route("glyphs/hebrew")
    before = frozen.weights().detach().clone()
    params = model.param_groups()
    params["routes"] = [model.route("glyphs/digits").logits]
    Trainer(model, two_tasks, quick(steps=20, discretize_at=0.5), params=params, progress=False).fit()
    assert not frozen.is_discrete and frozen.temperature.item() == 1.0
    assert torch.equal(frozen.weights(), before)
    assert model.route("glyphs/digits").is_discrete


def test_a_random_route_runs_the_modules_it_names():
    import copy

    spec = TaskSpec("t", 3, (1, 8, 8))
    torch.manual_seed(0)
    model = ModularNet(ModelConfig(channels=4, num_modules=3, steps=4, stem_stride=1), [spec]).eval()
    x = torch.rand(5, 1, 8, 8)
    fixed = copy.deepcopy(model)
    fixed.route("t").set_choice([2, 2, 0, 1])
    assert torch.equal(model(x, "t", modules=[2, 2, 0, 1]), fixed(x, "t"))
    with pytest.raises(IsomodError, match="modules must name one of the 3 pool modules at each of the 4 steps"):
        model(x, "t", modules=[3, 0, 0, 0])
    g = torch.Generator().manual_seed(0)
    draws = [RouteSchedule.soft(random=0.5).random_route(4, 3, g) for _ in range(400)]
    drawn = [d for d in draws if d is not None]
    assert 150 < len(drawn) < 250 and {m for d in drawn for m in d} == {0, 1, 2}
    assert any(len(set(d)) < 4 for d in drawn)  # repeats allowed
    assert RouteSchedule.soft().random_route(4, 3, g) is None


@pytest.mark.parametrize("random", [0.0, 1.0])
def test_random_routes_train_modules_no_task_route_runs(two_tasks, random):
    from isomod.training.regimes import REGIMES

    model_cfg, cfg = REGIMES["random_routes"].apply(ModelConfig(channels=4, steps=3), quick(steps=6))
    assert model_cfg.num_modules == 3 and cfg.route_random == 0.5
    torch.manual_seed(0)
    model = ModularNet(model_cfg, [t.spec for t in two_tasks])
    for t in two_tasks:
        model.route(t.spec.name).set_choice([0, 0, 0])  # modules 1 and 2 run only in random routes
    before = [b.w1.clone() for b in model.pool.blocks]
    Trainer(model, two_tasks, replace(cfg, route_random=random)).fit()
    moved = [not torch.equal(a, b.w1) for a, b in zip(before, model.pool.blocks)]
    assert moved == [True, bool(random), bool(random)]


@pytest.mark.parametrize("tasks_per_step,group", [(1, False), (2, False), (2, True)])
def test_training_steps_read_no_tensor_value_between_log_steps(two_tasks, monkeypatch, tasks_per_step, group):
    """On a GPU every `item()`, `tolist()` or `bool()` of a device tensor waits for the device:
    isomod's code makes none in the 20 steps between two log steps, soft routes or discrete
    (torch's own reads, such as an optimiser's step counter, are not isomod's)."""
    import sys
    from pathlib import Path

    import isomod

    src = str(Path(isomod.__file__).parent)
    calls = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(src):
                calls.append((name, caller.rsplit("/", 2)[-2:], sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)
        return wrapper

    model = tiny_model(two_tasks, route_init="flat")
    trainer = Trainer(model, two_tasks, quick(steps=200, log_every=50, tasks_per_step=tasks_per_step,
                                              discretize_at=1.0, group_tasks=group), progress=False)
    run = trainer.start()
    try:
        for phase in ("soft", "discrete"):
            if phase == "discrete":
                model.discretize()
            trainer.train_step(run)  # the first step after a change may set things up
            with monkeypatch.context() as patch:
                for name in ("item", "tolist", "__bool__"):
                    patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
                for _ in range(20):
                    trainer.train_step(run)
            assert not calls, f"{phase} routes: {calls}"
    finally:
        trainer.finish(run)
    assert trainer.step == 42


def test_task_draws_made_an_interval_at_a_time_resume_as_if_made_one_by_one():
    from isomod.training.batches import TaskDraws

    weights = torch.ones(5)
    one = torch.Generator().manual_seed(3)
    singly = [torch.multinomial(weights, 2, replacement=False, generator=one).tolist() for _ in range(9)]
    draws = TaskDraws(torch.Generator().manual_seed(3), weights, 2)
    draws.refill(4)
    got = [draws.next() for _ in range(3)]
    state = draws.state()  # a checkpoint after 3 steps, mid-interval
    got += [draws.next()]
    draws.refill(5)
    got += [draws.next() for _ in range(5)]
    assert got == singly
    resumed = TaskDraws(torch.Generator(), weights, 2)
    resumed.set_state(state)
    resumed.refill(6)
    assert [resumed.next() for _ in range(6)] == singly[3:]


def test_a_compiled_forward_holds_one_graph_for_every_task_without_breaks():
    """16 tasks, half on discrete routes: one graph per kind of call (soft, discrete, each
    with and without exchanged steps; a random route), never one per task, the eager numbers,
    and no graph break in a soft or a discrete route's forward (conv and transformer pools)."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    from isomod.core.network import ModelConfig, ModularNet
    from isomod.core.spec import TaskSpec
    from isomod.training.compiled import CompiledForward

    def pool(**extra):
        torch.manual_seed(0)
        net = ModularNet(ModelConfig(channels=8, num_modules=4, steps=3, **extra),
                         [TaskSpec(f"t{i}", 10) for i in range(16)])
        for i in range(8, 16):
            net.route(f"t{i}").set_choice([i % 4, (i + 1) % 4, (3 * i) % 4])
        return net

    x = torch.randn(4, 1, 28, 28)
    net, counter = pool(), CompileCounter()
    forward = CompiledForward(net, counter)
    calls = [(f"t{i}", {}) for i in range(16)] + [(t, o) for t in ("t1", "t2", "t9", "t10") for o in (
        {"step_order": torch.randperm(3)}, {"modules": [int(t[1:]) % 4, 1, 2]})]
    for task, options in calls:
        assert torch.allclose(forward(x, task, **options), net(x, task, **options), atol=1e-5)
    assert counter.frame_count == 5  # soft, discrete, each with and without a step order; a random route
    for net in (net, pool(block="transformer", heads=2)):
        for task in ("t0", "t9"):  # a soft route, a discrete one
            explained = dynamo.explain(net.branch_features)(x, net.branch(task), None, None, indexed=True)
            assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    with pytest.raises(Exception, match="unknown compile mode 'fast'"):
        TrainConfig(compile_mode="fast")


def test_the_optimizer_is_fused_on_a_gpu_and_foreach_on_the_cpu():
    from isomod.training.trainer import optimizer_kernels

    assert optimizer_kernels(torch.device("cuda")) == {"fused": True}
    assert optimizer_kernels(torch.device("cuda", 1)) == {"fused": True}
    assert optimizer_kernels(torch.device("cpu")) == {"foreach": True}
