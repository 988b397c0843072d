"""The step's tasks as one forward pass (`TrainConfig.group_tasks`): the per-task loop's
numbers, written-back statistics, refusals, and fewer operator calls."""

import copy

import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, TrainConfig, Trainer, distributed
from isomod.core.spec import TaskSpec
from isomod.training.grouped import GroupedForward
from isomod.training.runs import check_resumed_config

from conftest import glyph_task, subset

NAMES = ["a", "b", "c"]


def pool(norm_affine="step", block="conv", **kw):
    torch.manual_seed(0)
    config = ModelConfig(channels=8, num_modules=4, steps=3, norm_affine=norm_affine, block=block,
                         route_init="flat", image_size=12, **kw)
    model = ModularNet(config, [TaskSpec(n, 3 + i, (1, 12, 12)) for i, n in enumerate(NAMES)])
    model.route("c").set_choice([1, 3, 3])  # one discrete route among soft ones
    with torch.no_grad():
        for r in ("a", "b"):
            model.route(r).logits.normal_()
    return model.train()


@pytest.mark.parametrize("norm_affine", ["step", "module"])
@pytest.mark.parametrize("names", [NAMES, ["c", "a"]], ids=["all tasks", "two, reordered"])
def test_a_grouped_pass_computes_the_per_task_loop_numbers(norm_affine, names):
    """Features, every parameter's gradient and the norms' running statistics (after the
    write-back) as each task's own forward pass gives them, with every task or a subset in
    another order (the stacked statistics then gathered and scattered)."""
    loop = pool(norm_affine)
    grouped = copy.deepcopy(loop)
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(6, 1, 12, 12, generator=g) for _ in names]
    ref = [loop(x, n) for x, n in zip(xs, names)]
    fwd = GroupedForward(grouped, NAMES)
    out = fwd(xs, names)
    for r, o in zip(ref, out):
        assert r.shape == o.shape and torch.allclose(r, o, atol=1e-5)
    sum((r * torch.arange(r.shape[1])).sum() for r in ref).backward()
    sum((o * torch.arange(o.shape[1])).sum() for o in out).backward()
    got = dict(grouped.named_parameters())
    trained = 0
    for name, p in loop.named_parameters():
        q = got[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            trained += 1
            assert torch.allclose(p.grad, q.grad, atol=1e-5 * max(1.0, p.grad.abs().max().item())), name
    assert trained > 20
    untouched = [b.clone() for b in grouped.branch("b").norms[0].buffers()] if "b" not in names else None
    fwd.write_back()
    buffers = dict(grouped.named_buffers())
    for name, b in loop.named_buffers():
        assert torch.allclose(b.float(), buffers[name].float(), atol=1e-6), name
    if untouched is not None:  # a task the step did not draw keeps its statistics
        assert all(torch.equal(u, b) for u, b in zip(untouched, grouped.branch("b").norms[0].buffers()))
    fwd.write_back()  # a second write-back changes nothing
    assert all(torch.equal(b, dict(grouped.named_buffers())[n]) for n, b in buffers.items())


def test_grouped_statistics_over_ranks_match_one_process(monkeypatch):
    """Under data parallelism each grouped norm gathers its statistics over the ranks: two
    ranks holding the same images compute what one process does."""
    one, two = pool(), pool()
    xs = [torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reference = GroupedForward(one, NAMES)
    expected = reference(xs, NAMES)
    reference.write_back()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed._SumOverRanks, "apply", staticmethod(lambda t: 2 * t))
    fwd = GroupedForward(two, NAMES)
    got = fwd(xs, NAMES)
    assert all(torch.allclose(e, g, atol=1e-5) for e, g in zip(expected, got))
    fwd.write_back()
    for n in NAMES:
        for ours, theirs in zip(two.branch(n).norms, one.branch(n).norms):
            assert torch.allclose(ours.running_mean, theirs.running_mean, atol=1e-6)
            assert not torch.equal(ours.running_mean, torch.zeros_like(ours.running_mean))


def test_a_grouped_run_trains_as_the_loop_does_and_writes_its_statistics_back(tmp_path):
    """Trained with group_tasks, two tasks reach the loop's losses (float rounding apart), and
    the checkpoint and the model hold the norms' statistics of every step it ran."""
    tasks = [subset(glyph_task("digits"), 40, 20), subset(glyph_task("hebrew"), 40, 20)]
    histories, models = [], []
    for group in (False, True):
        torch.manual_seed(0)
        model = ModularNet(ModelConfig(channels=8, num_modules=3, steps=3), [t.spec for t in tasks])
        model.stem.bias.requires_grad_(False)  # zero gradient up to rounding: Adam would amplify it
        config = TrainConfig(steps=12, batch_size=16, lr=5e-3, warmup_steps=2, log_every=4, checkpoint_every=6,
                             discretize_at=0.5, tasks_per_step=2, group_tasks=group, augment=True)
        trainer = Trainer(model, tasks, config, out_dir=tmp_path / str(group), progress=False)
        trainer.fit()
        histories.append([h["loss"] for h in trainer.history])
        models.append(model)
    assert histories[0] == pytest.approx(histories[1], rel=2e-3)
    for name in ("glyphs/digits", "glyphs/hebrew"):
        loop, grouped = models[0].branch(name).norms, models[1].branch(name).norms
        assert [int(n.num_batches_tracked) for n in grouped] == [int(n.num_batches_tracked) for n in loop] == [12] * 7
        assert all(torch.allclose(a.running_var, b.running_var, rtol=1e-2, atol=1e-3) for a, b in zip(loop, grouped))
    from isomod.io.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "True" / "checkpoint")
    assert all(torch.equal(v, models[1].state_dict()[k]) for k, v in saved.state_dict().items())


def test_group_tasks_refuses_what_it_cannot_group_in_one_line():
    tasks = [subset(glyph_task("digits"), 40, 10), subset(glyph_task("hebrew"), 40, 10)]
    short = subset(glyph_task("greek"), 12, 5)
    config = TrainConfig(steps=2, batch_size=16, tasks_per_step=2, group_tasks=True, checkpoint_every=0)

    def refusal(model, tasks, config, **kw):
        with pytest.raises(IsomodError) as err:
            Trainer(model, tasks, config, progress=False, **kw).fit()
        text = str(err.value)
        assert text.startswith("group_tasks cannot train this run: ") and "\n" not in text
        return text

    def net(tasks, **kw):
        return ModularNet(ModelConfig(channels=8, num_modules=3, steps=2, **kw), [t.spec for t in tasks])

    assert "block 'transformer'" in refusal(net(tasks, block="transformer", heads=2, stem_stride=4), tasks, config)
    assert "mixing 'output'" in refusal(net(tasks, mixing="output"), tasks, config)
    assert "one size" in refusal(net(tasks + [short]), tasks + [short], config)
    assert "route_swap" in refusal(net(tasks), tasks, TrainConfig(**{**config.__dict__, "route_swap": 0.5}))
    model = net(tasks)
    assert "eval mode" in refusal(model, tasks, config, fixed_stats=[model.branch("glyphs/digits")])
    assert "cross-entropy" in refusal(net(tasks), tasks, config,
                                      objective=lambda m, x, y, t: (m(x, t).logsumexp(1).mean(), None))


def test_resuming_without_the_newer_options_in_the_saved_config_is_accepted():
    """A run saved before `compile_mode` and `group_tasks` existed resumes, with or without
    them: they change how the run computes, not what."""
    now = TrainConfig(group_tasks=True, compile_mode="default").__dict__
    saved = {k: v for k, v in now.items() if k not in ("compile_mode", "group_tasks")}
    assert check_resumed_config(saved, now, extend=False) is None


VIEWS = {f"aten::{n}" for n in ("as_strided view slice narrow select detach unbind split split_with_sizes expand "
                                  "permute transpose reshape _reshape_alias alias unsqueeze squeeze t flatten").split()}


def test_a_grouped_step_makes_far_fewer_operator_calls():
    """Operator calls that are not views (each a kernel launch on a GPU) of a 3-task step's
    forward and backward, counted by the profiler, nested calls included: the grouped pass
    makes under half the loop's."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for group in (False, True):
        model = pool()
        xs = [torch.rand(4, 1, 12, 12) for _ in NAMES]
        fwd = GroupedForward(model, NAMES) if group else None
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fwd(xs, NAMES) if group else [model(x, n) for x, n in zip(xs, NAMES)]
            sum(o.sum() for o in out).backward()
        counts.append(sum(e.name.startswith("aten::") and e.name not in VIEWS for e in prof.events()))
    assert counts[1] < counts[0] / 2, counts
