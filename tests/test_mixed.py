"""One batch, many tasks (`isomod.core.mixed`): `net(x, tasks)` equals each image run under its
own task, for conv and transformer pools, discrete and soft routes, and domains of one label
space."""

import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, TaskSpec


def pool(block: str, norm_affine: str = "step", mixing: str = "weight"):
    torch.manual_seed(0)
    extra = {"block": "transformer", "heads": 2, "stem_stride": 4, "image_size": 12} if block == "transformer" else {}
    specs = [TaskSpec("a", 3, (1, 12, 12)), TaskSpec("b", 5, (1, 12, 12)), TaskSpec("c", 4, (1, 12, 12)),
             TaskSpec("d1", 6, (1, 12, 12), label_space="digits"), TaskSpec("d2", 6, (1, 12, 12), label_space="digits")]
    net = ModularNet(ModelConfig(channels=8, num_modules=4, steps=3, norm_affine=norm_affine, mixing=mixing, **extra),
                     specs)
    with torch.no_grad():  # every task its own statistics and affine parameters
        for name, buf in net.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                buf.normal_(0, 0.3)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.route("b").set_choice([1, 2, 3])  # discrete
    net.route("c").set_choice([1, 0, 3])  # discrete, sharing modules 1 and 3 with b
    net.route("d2").set_choice([2, 2, 2])  # a domain, discrete, a module repeated
    return net.eval()


@pytest.mark.parametrize("block, norm_affine, mixing", [("conv", "step", "weight"), ("conv", "module", "weight"),
                                                        ("transformer", "step", "weight"),
                                                        ("transformer", "module", "weight"),
                                                        ("conv", "step", "output")])
def test_a_mixed_batch_equals_each_image_under_its_own_task(block, norm_affine, mixing):
    net = pool(block, norm_affine, mixing)
    torch.manual_seed(1)
    tasks = ["a", "b", "c", "d1", "d2", "b", "a", "d2", "c", "c", "a", "d1"]
    x = torch.rand(len(tasks), 1, 12, 12)
    with torch.no_grad():
        logits = net(x, tasks)
        assert logits.shape == (len(tasks), 6)
        for i, t in enumerate(tasks):
            own = net(x[i : i + 1], t)[0]
            k = own.shape[0]
            assert torch.allclose(logits[i, :k], own, atol=1e-5), (i, t)
            assert torch.isinf(logits[i, k:]).all() and (logits[i, k:] < 0).all()
        assert torch.equal(logits.argmax(-1), torch.stack([net(x[i : i + 1], t)[0].argmax() for i, t in enumerate(tasks)]))
        assert torch.allclose(torch.softmax(logits, -1)[:, :3].sum(-1)[[0, 6, 10]], torch.ones(3))


def test_a_mixed_batch_refuses_what_it_cannot_serve():
    net = pool("conv")
    x = torch.rand(3, 1, 12, 12)
    with pytest.raises(IsomodError, match="one task name per image: 2 names for 3 images"):
        net(x, ["a", "b"])
    with pytest.raises(IsomodError, match="unknown task 'z'"):
        net(x, ["a", "b", "z"])
    net.train()
    with pytest.raises(IsomodError, match="runs in eval mode"):
        net(x, ["a", "b", "a"])
    net.eval()
    assert torch.equal(net(x, ["b", "b", "b"]), net(x, "b"))  # one task: the plain forward
