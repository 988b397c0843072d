"""Route diagnostics: distance between routes, cross-route and shuffled-route accuracy."""

import pytest
import torch

from isomod import ModelConfig, ModularNet, PlainResNet, TaskSpec, TrainConfig, Trainer, evaluate
from isomod.diagnostics import cross_route_accuracy, own_and_other, route_distance, shuffled_accuracy
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
