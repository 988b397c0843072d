"""Route diagnostics: distance between routes, cross-route and shuffled-route accuracy."""

import pytest
import torch

from isomod import ModelConfig, ModularNet, PlainResNet, TaskSpec, TrainConfig, Trainer, evaluate
from isomod.methods.diagnostics import cross_route_accuracy, own_and_other, route_distance, shuffled_accuracy
from isomod.errors import IsomodError


def test_route_distance_of_discrete_and_soft_routes():
    net = ModularNet(ModelConfig(channels=4, num_modules=4, steps=4), [TaskSpec(n, 2) for n in "abc"])
    net.route("a").set_choice([0, 1, 2, 3])
    net.route("b").set_choice([0, 1, 2, 3])
    assert route_distance(net, ["a", "b"]) == 0.0
    net.route("c").set_choice([1, 0, 3, 2])
    assert route_distance(net, ["a", "c"]) == 1.0
    assert route_distance(net) == pytest.approx(2 / 3)
    with pytest.raises(IsomodError, match="route distance needs a model whose tasks own routes"):
        route_distance(PlainResNet(ModelConfig(channels=4), [TaskSpec("a", 2)]))


def test_cross_route_and_shuffled_accuracy_leave_every_route_as_it_was(two_tasks):
    torch.manual_seed(0)
    net = ModularNet(ModelConfig(channels=8, num_modules=3, steps=3), [t.spec for t in two_tasks])
    Trainer(net, two_tasks, TrainConfig(steps=30, batch_size=32, warmup_steps=2, lr=5e-3, checkpoint_every=0,
                                        discretize_at=0.5), progress=False).fit()
    net.route(two_tasks[1].name).logits.requires_grad_(True)  # a soft-trainable route stays so
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tasks = {t.name: t for t in two_tasks}
    names, acc = cross_route_accuracy(net, tasks)
    own = evaluate(net, tasks)
    assert acc.shape == (2, 2) and [acc[i, i].item() for i in range(2)] == [own[n] for n in names]
    assert own_and_other(acc) == (pytest.approx(acc.diagonal().mean().item()),
                                  pytest.approx((acc[0, 1] + acc[1, 0]).item() / 2))
    shuffled = shuffled_accuracy(net, tasks)
    assert set(shuffled) == set(names) and all(0 <= a <= 1 for a in shuffled.values())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.route(two_tasks[1].name).logits.requires_grad


def test_bench_mtl_on_a_validation_split_never_reads_the_test_images(tmp_path):
    """Hyper-parameters are chosen with `validation`: rows report `val_acc` on held-out
    training images, and the test images are never run."""
    from isomod.bench import mtl
    from isomod.data.tasks import TaskData

    from conftest import glyph_task

    tasks = [glyph_task("digits", 20, 5), glyph_task("hebrew", 20, 5)]
    # Three-channel test images: running them through the one-channel stem would fail.
    poisoned = [TaskData(t.spec, t.x_train, t.y_train, t.x_test.repeat(1, 3, 1, 1), t.y_test) for t in tasks]
    config = mtl.MtlConfig(seeds=[0], methods=["modular", "independent"], validation=0.2,
                           model=ModelConfig(channels=4, steps=2, stem_stride=4),
                           train=TrainConfig(steps=4, batch_size=8, warmup_steps=1, checkpoint_every=0, log_every=1))
    results = mtl.run(tmp_path, config, progress=False, tasks=poisoned)
    accs = [r for r in results["rows"] if r["metric"] in ("val_acc", "test_acc")]
    assert accs and all(r["metric"] == "val_acc" for r in accs)
    assert {r["task"] for r in accs} == {"glyphs/digits", "glyphs/hebrew", "mean"}
    assert "Validation accuracy (%) on 20% of each task's training images" in (tmp_path / "report.md").read_text()
    assert {r["metric"] for r in results["rows"]} >= {"loss_fourth_fifth", "loss_last_fifth", "shuffled_acc"}
