"""A pool of transformer blocks: the invariants the convolution pool's tests pin, for the
second block type (one-hot soft == discrete == output mixing, weight mixing is its
definition, export parity, adding a task changes nothing, checkpoints round-trip), plus
training, transfer, adaptation and the benches on it."""

import copy

import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, PlainResNet, TaskSpec, TrainConfig, Trainer, evaluate
from isomod.core.blocks import TransformerModule, transformer_block
from isomod.io.checkpoint import load_checkpoint, save_checkpoint
from isomod.data.tasks import TaskData
from isomod.io.export import export_task, save_onnx, save_torchscript


def config(**kw):
    return ModelConfig(**{"block": "transformer", "channels": 16, "num_modules": 4, "steps": 3, "stem_stride": 7,
                          "heads": 4, "image_size": 28, **kw})


def model(norm_affine="step", tasks=("a", "b")):
    torch.manual_seed(0)
    return ModularNet(config(norm_affine=norm_affine), [TaskSpec(t, 5) for t in tasks]).eval()


def one_hot(net, task, choice):
    route = net.route(task)
    route.choice.fill_(-1)
    with torch.no_grad():
        route.logits.fill_(-1e4)
        route.logits[torch.arange(route.steps), torch.tensor(choice)] = 1e4


@pytest.mark.parametrize("norm_affine", ["step", "module"])
def test_one_hot_soft_equals_discrete_equals_output_mixing(norm_affine):
    net = model(norm_affine)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        net.route("a").set_choice([2, 0, 2])
        discrete = net(x, "a")
        one_hot(net, "a", [2, 0, 2])
        weight = net(x, "a")
        net.config.mixing = "output"
        output = net(x, "a")
    assert torch.allclose(discrete, weight, atol=1e-6) and torch.allclose(discrete, output, atol=1e-6)


def test_weight_mixing_runs_the_block_with_the_mixed_weights():
    net = model("module")
    x = torch.rand(3, 1, 28, 28)
    route, norms = net.route("a"), net.branch("a").norms
    w = route.weights()  # (L, N)
    with torch.no_grad():
        h = net.stem(x)
        for l in range(route.steps):
            p = {n: sum(w[l, m] * getattr(net.pool.blocks[m], n) for m in range(len(net.pool)))
                 for n in net.pool.param_names}
            h = TransformerModule.run(h, p, norms[2 * l], norms[2 * l + 1], net.config.heads)
        expected = net.head_of("a")(norms[-1](h).mean(1))
        assert torch.allclose(net(x, "a"), expected, atol=1e-5)


def test_the_block_is_a_pure_function_of_its_weights():
    block = TransformerModule(16, heads=4)
    x = torch.randn(2, 5, 16)
    ln = torch.nn.LayerNorm(16)
    direct = block(x, ln, ln)
    functional = transformer_block(x, *(getattr(block, n) for n in TransformerModule.WEIGHTS), ln, ln, 4)
    assert torch.equal(direct, functional) and direct.shape == x.shape


@pytest.mark.parametrize("norm_affine", ["step", "module"])
@pytest.mark.parametrize("soft", [True, False])
def test_export_matches_the_model_in_torchscript_and_onnx(norm_affine, soft, tmp_path):
    net = model(norm_affine)
    if not soft:
        net.route("a").set_choice([1, 3, 1])
    x = torch.rand(4, 1, 28, 28)
    static = export_task(net, "a")
    with torch.no_grad():
        expected = net(x, "a")
        assert torch.allclose(static(x), expected, atol=1e-5)
    if not soft:
        # modules 1 and 3 stored once each, the stem (projection and positions), the final norm, the head
        assert len(list(static.parameters())) == 2 * len(TransformerModule.WEIGHTS) + 3 + 2 + 2
    save_torchscript(static, tmp_path / "a.pt")
    assert torch.allclose(torch.jit.load(str(tmp_path / "a.pt"))(x), expected, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    save_onnx(static, tmp_path / "a.onnx", x[:2])
    out = ort.InferenceSession(str(tmp_path / "a.onnx")).run(None, {"images": x.numpy()})[0]
    assert abs(out - expected.numpy()).max() < 1e-4


def test_adding_a_task_leaves_the_others_bit_identical_and_checkpoints_round_trip(tmp_path):
    net = model("module")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        before = net(x, "a")
        net.add_task(TaskSpec("c", 3), source="a")
        net.add_modules(2)
        assert torch.equal(before, net(x, "a"))
    save_checkpoint(net, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck").eval()
    assert loaded.config.block == "transformer" and len(loaded.pool) == 6
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(loaded(x, "a"), before)


def test_a_transformer_takes_the_image_size_its_position_embedding_covers():
    net = model()
    with pytest.raises(IsomodError, match="has 32x32 images; this transformer's position embedding covers 28x28"):
        net.add_task(TaskSpec("big", 3, (1, 32, 32)))
    with pytest.raises(IsomodError, match="expected 28x28 images"):
        net(torch.rand(2, 1, 32, 32), "a")
    with pytest.raises(IsomodError, match="must be divisible by its heads"):
        config(channels=18)


def test_transformer_pool_and_plain_vit_learn_and_transfer(digit_tasks):
    from isomod.methods.transfer import transfer

    glyph_a, glyph_b = digit_tasks  # MNIST, UCI digits
    cfg = TrainConfig(steps=300, batch_size=32, lr=3e-3, lr_heads=3e-3, warmup_steps=5, checkpoint_every=0,
                      discretize_at=0.75)
    torch.manual_seed(0)
    net = ModularNet(config(channels=24, num_modules=4, steps=4), [glyph_a.spec])
    acc = Trainer(net, [glyph_a], cfg, progress=False).fit()[glyph_a.name]
    assert acc > 0.2, acc  # chance is 0.1 (measured: 0.33; transformers learn slowly from 1,500 images)
    plain = PlainResNet(config(channels=24, steps=4), [glyph_a.spec])
    assert Trainer(plain, [glyph_a], cfg, progress=False).fit()[glyph_a.name] > 0.3  # measured: 0.54
    res = transfer(copy.deepcopy(net), glyph_b, "route_only", TrainConfig(steps=30, batch_size=32, lr=5e-2,
                   lr_heads=5e-2, warmup_steps=2, checkpoint_every=0, routes="soft"), source=glyph_a.name,
                   progress=False)
    assert res.test_acc > 0.15 and res.route_steps_changed is not None  # measured: 0.23


def test_adaptation_over_a_transformer_pool_keeps_what_is_shared():
    from isomod.methods.adapt import adapt

    g = torch.Generator().manual_seed(0)

    def domain(name, shift):
        x = torch.randint(0, 256, (96, 1, 28, 28), generator=g, dtype=torch.uint8) // (1 + shift)
        y = torch.arange(96) % 3
        return TaskData(TaskSpec(name, 3, label_space="d"), x, y, x[:30], y[:30])

    sources = [domain("s1", 0), domain("s2", 1)]
    torch.manual_seed(0)
    net = ModularNet(config(), [s.spec for s in sources])
    Trainer(net, sources, TrainConfig(steps=10, batch_size=16, checkpoint_every=0), progress=False).fit()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = adapt(net, domain("t", 2), "route_im", TrainConfig(steps=6, batch_size=32, checkpoint_every=0),
                progress=False)
    assert res.params_task > 0 and all(torch.equal(before[k], net.state_dict()[k]) for k in before)
    assert 0 <= evaluate(net, {"t": domain("t", 2)})["t"] <= 1
    with pytest.raises(IsomodError, match="route_select compares norm statistics"):
        adapt(copy.deepcopy(net), domain("t2", 2), "route_select", progress=False)
