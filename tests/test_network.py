"""The network (`isomod.core.network`, with its pool and routes): shapes and routing maths; soft, discrete and output mixing; pool operations."""

import copy
import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, Route, TaskSpec


def make_net(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(channels=8, num_modules=4, steps=6, **kw)
    return ModularNet(cfg, [TaskSpec("a", 10), TaskSpec("b", 5)])


def x_batch(n=4):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_shapes():
    net = make_net()
    x = x_batch(3)
    assert net(x, "a").shape == (3, 10)
    assert net(x, "b").shape == (3, 5)
    assert net.forward_features(x, "a").shape == (3, 8)
    assert net.route("a").weights().shape == (6, 4)


def test_route_weights_are_softmax_with_temperature():
    r = Route(5, 3, init="random", init_scale=1.0)
    w = r.weights()
    assert torch.allclose(w.sum(-1), torch.ones(5))
    torch.testing.assert_close(w, torch.softmax(r.logits, -1))
    r.logits.data.copy_(torch.tensor([0.0, 0.1, 0.3]).repeat(5, 1))  # gaps of at least 0.1
    r.temperature.fill_(0.01)
    assert r.weights().max(-1).values.min() > 0.99
    assert r.entropy() < 0.05


def test_discretize_takes_argmax_and_prints_indices():
    r = Route(8, 8)
    expected = r.logits.argmax(-1).tolist()
    r.discretize()
    assert r.is_discrete and r.indices() == expected
    assert str(r) == " ".join(map(str, expected))
    assert torch.equal(r.weights(), torch.eye(8)[expected])
    assert r.entropy().item() == 0.0
    assert not r.logits.requires_grad


def test_route_str_names_task():
    net = make_net()
    net.route("a").set_choice([3, 3, 1, 0, 2, 2])
    assert net.route_str("a") == "a: 3 3 1 0 2 2"
    assert "soft" in net.route_str("b")


def randomise_module_norms(net):
    """Module-owned norm scales and shifts away from 1 and 0, so that a wrong mixture shows."""
    with torch.no_grad():
        for name, p in net.pool.named_parameters():
            if name.split(".")[-1] in ("g1", "g2", "b1", "b2"):
                p.uniform_(0.5, 1.5) if name[-2] == "g" else p.uniform_(-0.3, 0.3)


@pytest.mark.parametrize("norm_affine", ["step", "module"])
def test_one_hot_soft_equals_discrete_equals_output_mixing(norm_affine):
    net = make_net(norm_affine=norm_affine).eval()
    randomise_module_norms(net)
    x = x_batch()
    pattern = [2, 0, 0, 3, 1, 2]
    logits = torch.full((6, 4), -1e4)
    logits[torch.arange(6), torch.tensor(pattern)] = 1e4
    net.route("a").logits.data.copy_(logits)
    soft_weight = net(x, "a")
    net.config.mixing = "output"
    soft_output = net(x, "a")
    net.route("a").set_choice(pattern)
    discrete = net(x, "a")
    torch.testing.assert_close(soft_weight, discrete, rtol=0, atol=1e-6)
    torch.testing.assert_close(soft_output, discrete, rtol=0, atol=1e-6)


def test_soft_weight_mixing_runs_the_mixed_block():
    """Weight mixing equals running one block whose weights are the route-weighted sum."""
    from isomod.core.blocks import residual_block

    net = make_net().eval()
    x = x_batch()
    route, norms = net.route("a"), net.tasks["a"].norms
    w = route.weights()
    h = net.stem(x)
    for l in range(6):
        w1 = sum(w[l, n] * net.pool.blocks[n].w1 for n in range(4))
        w2 = sum(w[l, n] * net.pool.blocks[n].w2 for n in range(4))
        h = residual_block(h, w1, w2, norms[2 * l], norms[2 * l + 1])
    h = torch.relu(norms[-1](h)).mean((2, 3))
    torch.testing.assert_close(net.tasks["a"].head(h), net(x, "a"), rtol=1e-5, atol=1e-5)


def test_module_owned_norms_are_mixed_like_the_weights():
    """With `norm_affine="module"` a step runs the statistics of its own norms and the
    route-weighted sum of the modules' scales and shifts."""
    from isomod.core.blocks import residual_block, with_affine

    net = make_net(norm_affine="module").eval()
    randomise_module_norms(net)
    x = x_batch()
    route, norms = net.route("a"), net.tasks["a"].norms
    assert all(n.weight is None for n in norms[:-1]) and norms[-1].weight is not None
    w = route.weights()
    h = net.stem(x)
    blocks = net.pool.blocks
    for l in range(6):
        mix = {k: sum(w[l, n] * getattr(blocks[n], k) for n in range(4)) for k in ("w1", "w2", "g1", "b1", "g2", "b2")}
        h = residual_block(h, mix["w1"], mix["w2"], with_affine(norms[2 * l], mix["g1"], mix["b1"]),
                           with_affine(norms[2 * l + 1], mix["g2"], mix["b2"]))
    h = torch.relu(norms[-1](h)).mean((2, 3))
    torch.testing.assert_close(net.tasks["a"].head(h), net(x, "a"), rtol=1e-5, atol=1e-5)
    net(x, "a").sum().backward()
    assert all(b.g1.grad is not None and b.b2.grad is not None for b in blocks)
    # A task then owns only its route, its final norm and its head.
    owned = 6 * 4 + 2 * 8 + (8 * 10 + 10)
    assert net.task_param_count("a") == owned


def test_output_mixing_differs_from_weight_mixing_when_soft():
    net = make_net(route_init_scale=2.0).eval()
    x = x_batch()
    a = net(x, "a")
    net.config.mixing = "output"
    assert not torch.allclose(a, net(x, "a"), atol=1e-4)


def test_gradients_reach_routes_pool_norms_and_heads():
    net = make_net()
    net(x_batch(), "a").sum().backward()
    assert net.route("a").logits.grad.abs().sum() > 0
    assert all(b.w1.grad is not None for b in net.pool.blocks)
    assert net.tasks["a"].norms[0].weight.grad is not None
    assert net.route("b").logits.grad is None


def test_adding_a_task_leaves_existing_outputs_bit_identical():
    net = make_net().eval()
    net.route("b").discretize()
    x = x_batch()
    before = {t: net(x, t) for t in ("a", "b")}
    net.add_task(TaskSpec("c", 7))
    net.eval()
    for t in ("a", "b"):
        assert torch.equal(before[t], net(x, t))
    assert net(x, "c").shape == (4, 7)


def test_add_modules_keeps_outputs_and_new_modules_are_unused():
    net = make_net().eval()
    net.route("a").set_choice([0, 1, 2, 3, 0, 1])
    x = x_batch()
    before_a, before_b = net(x, "a"), net(x, "b")
    assert net.add_modules(2) == [4, 5]
    assert len(net.pool) == 6
    assert torch.equal(before_a, net(x, "a"))
    assert torch.equal(before_b, net(x, "b"))  # a soft route: the same mixture of the same modules
    assert net.route("b").weights()[:, 4:].max() == 0 and net.route("b").support().tolist() == [0, 1, 2, 3]


def test_remove_unused_module_renumbers_routes():
    net = make_net().eval()
    net.route("a").set_choice([0, 3, 3, 1, 0, 3])
    net.route("b").set_choice([3, 1, 0, 0, 1, 3])
    x = x_batch()
    before = net(x, "a")
    net.remove_module(2)
    assert len(net.pool) == 3
    assert net.route("a").indices() == [0, 2, 2, 1, 0, 2]
    assert torch.equal(before, net(x, "a"))
    with pytest.raises(IsomodError, match="module 2 is used by task"):
        net.remove_module(2)


def test_freeze_modules():
    net = make_net()
    net.pool.freeze([1, 2])
    assert net.pool.frozen() == [False, True, True, False]
    net(x_batch(), "a").sum().backward()
    assert net.pool.blocks[1].w1.grad is None and net.pool.blocks[0].w1.grad is not None
    assert len(net.param_groups()["pool"]) == 4


def test_param_groups_and_task_parameter_count():
    net = make_net()
    groups = net.param_groups()
    assert set(groups) == {"stem", "pool", "routes", "norms", "heads"}
    assert len(groups["routes"]) == 2
    # route logits + (2L + 1) norms of 2C affine parameters + head
    assert net.task_param_count("a") == 6 * 4 + 13 * 2 * 8 + (8 * 10 + 10)
    net.freeze_shared()
    assert net.param_groups()["pool"] == [] and net.param_groups()["stem"] == []


def test_bad_inputs_raise_clear_errors():
    net = make_net()
    with pytest.raises(IsomodError, match="unknown task 'zz'; this model has: a, b"):
        net(x_batch(), "zz")
    with pytest.raises(IsomodError, match="expected input"):
        net(torch.randn(2, 3, 28, 28), "a")
    with pytest.raises(IsomodError, match="3-channel inputs"):
        net.add_task(TaskSpec("rgb", 10, (3, 32, 32)))
    with pytest.raises(IsomodError, match="already exists"):
        net.add_task(TaskSpec("a", 10))
    with pytest.raises(IsomodError, match="unknown mixing"):
        ModelConfig(mixing="nope")
    with pytest.raises(IsomodError, match="outside"):
        net.route("a").set_choice([0, 0, 0, 0, 0, 9])


def test_fixed_route_and_repeats():
    r = Route.fixed([0, 1, 2, 3, 0, 1, 2, 3], 4)
    assert r.is_discrete and str(r) == "0 1 2 3 0 1 2 3"
    net = make_net()
    net.route("a").set_choice([1] * 6)
    assert net(x_batch(), "a").shape == (4, 10)


def test_output_mixing_updates_each_step_s_first_norm_once_per_forward():
    net = make_net(mixing="output", route_init_scale=0.0)  # uniform weights: all 4 modules run
    norm1 = net.tasks["a"].norms[0]
    net.train()
    net(x_batch(), "a")
    assert norm1.num_batches_tracked.item() == 1


def test_tasks_of_a_step_share_one_weight_stack_and_gradients_stay_exact():
    torch.manual_seed(0)
    net = ModularNet(ModelConfig(channels=8, num_modules=4, steps=4), [TaskSpec("a", 3), TaskSpec("b", 3)])
    x = torch.rand(4, 1, 28, 28)
    first = net.pool.stacked()
    assert net.pool.stacked()["w1"] is first["w1"]  # nothing changed: the same stack
    (net(x, "a").sum() + net(x, "b").sum()).backward()
    once = net.pool.blocks[1].w2.grad.clone()
    # Accumulating a second identical pass through the reused stack doubles the gradient.
    (net(x, "a").sum() + net(x, "b").sum()).backward()
    assert torch.allclose(net.pool.blocks[1].w2.grad, 2 * once)
    twin = copy.deepcopy(net)  # the cached stack, which has autograd history, is not copied
    assert torch.equal(twin(x, "a"), net(x, "a"))
    # Any change of the weights builds a new stack: in place, by loading, or by a dtype move.
    with torch.no_grad():
        net.pool.blocks[0].w1.mul_(2)
    assert torch.equal(net.pool.stacked()["w1"][0], net.pool.blocks[0].w1)
    net.load_state_dict({k: v + 1 if v.is_floating_point() else v for k, v in net.state_dict().items()})
    assert torch.equal(net.pool.stacked()["w2"][3], net.pool.blocks[3].w2)
    net.to(torch.float64)
    assert net.pool.stacked()["w1"].dtype == torch.float64


def test_route_mixing_stays_fp32_under_a_bf16_autocast():
    """The route's weights mix the modules in fp32 whatever the autocast: its gradient passes
    through that product (in bf16 it kept 8 bits of mantissa)."""
    torch.manual_seed(0)
    net = ModularNet(ModelConfig(channels=8, num_modules=4, steps=3, route_init="flat"), [TaskSpec("t", 3, (1, 12, 12))])
    route = net.route("t")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = net.mixed_params(route)
        loss = net(torch.rand(2, 1, 12, 12), "t").float().sum()
    assert {m.dtype for m in mixed.values()} == {torch.float32}
    loss.backward()
    assert route.logits.grad is not None and route.logits.grad.dtype == torch.float32
    exact = {k: torch.tensordot(route.weights().double(), s.double(), dims=1) for k, s in net.pool.stacked().items()}
    assert all(torch.allclose(mixed[k].double(), exact[k], atol=1e-6) for k in mixed)


def test_attention_is_the_softmax_of_scaled_dot_products():
    from isomod.core.blocks import attention

    torch.manual_seed(0)
    b, t, c, heads = 2, 5, 8, 2
    x, qkv_w, qkv_b = torch.randn(b, t, c), torch.randn(3 * c, c), torch.randn(3 * c)
    proj_w, proj_b = torch.randn(c, c), torch.randn(c)
    qkv = torch.nn.functional.linear(x, qkv_w, qkv_b).view(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (c // heads) ** -0.5, dim=-1)  # (B, H, T, T)
    expected = torch.nn.functional.linear((att @ qkv[2]).transpose(1, 2).reshape(b, t, c), proj_w, proj_b)
    assert torch.allclose(attention(x, qkv_w, qkv_b, proj_w, proj_b, heads), expected, atol=1e-5)
