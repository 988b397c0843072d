"""Export: a route (discrete or soft) as a static network, TorchScript without isomod, ONNX under onnxruntime."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, TaskSpec, save_checkpoint
from isomod.cli import main
from isomod.io.export import export_task, save_onnx, save_torchscript


@pytest.fixture(params=["step", "module"])
def model(request):
    """Two tasks with their own norm statistics; `t` runs module 0 three times. The norms'
    affine parameters belong to the steps, or to the modules."""
    torch.manual_seed(0)
    net = ModularNet(ModelConfig(channels=8, num_modules=3, steps=5, norm_affine=request.param),
                     [TaskSpec("t", 4), TaskSpec("u", 3)])
    net.route("t").set_choice([0, 1, 0, 2, 0])
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.rand(16, 1, 28, 28) * 2, "t")
        for norm in net.branch("t").norms:
            if norm.weight is not None:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.2, 0.2)
        for name, p in net.pool.named_parameters():
            if name.split(".")[-1] in ("g1", "g2"):
                p.uniform_(0.5, 1.5)
            elif name.split(".")[-1] in ("b1", "b2"):
                p.uniform_(-0.2, 0.2)
    return net.eval()


def test_export_matches_and_stores_each_module_once(model):
    net = export_task(model, "t")
    x = torch.rand(7, 1, 28, 28)
    assert (net(x) - model(x, "t")).abs().max().item() < 1e-5
    # Module 0 runs at steps 0, 2, 4 with one weight pair; modules 1 and 2, used once each,
    # carry their step's second norm folded into their first convolution.
    steps = list(net.steps)
    assert steps[0].w1 is steps[2].w1 is steps[4].w1 and steps[0].w2 is steps[4].w2
    assert steps[1].bias1 is not None and steps[0].bias1 is None
    pool = model.pool.blocks
    stored = sum(p.numel() for p in net.parameters())
    expected = (sum(pool[i].w1.numel() + pool[i].w2.numel() for i in (0, 1, 2)) + 2 * 8
                + sum(p.numel() for p in model.stem.parameters()) + sum(p.numel() for p in model.head_of("t").parameters()))
    assert stored == expected


def test_a_soft_route_exports_its_mixed_weights(model, tmp_path):
    with torch.no_grad():
        model.route("u").logits.normal_(0, 1.5)
    net = export_task(model, "u")
    x = torch.rand(7, 1, 28, 28)
    assert net.soft and (net(x) - model(x, "u")).abs().max().item() < 1e-5
    # One mixed block per step, each step's second norm folded: L * (2 C C k k + C) numbers.
    c, k, steps = 8, 3, 5
    assert sum(p.numel() for s in net.steps for p in s.parameters()) == steps * (2 * c * c * k * k + c)
    ort = pytest.importorskip("onnxruntime")
    path = save_onnx(net, tmp_path / "u.onnx", torch.rand(2, 1, 28, 28))
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - model(x, "u").detach().numpy()).max() < 1e-5


def test_a_one_hot_soft_route_exports_like_the_discrete_one(model):
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        model.route("u").logits.copy_(torch.eye(3)[[2, 0, 1, 1, 0]] * 1e4)
    soft = export_task(model, "u")(x)
    model.route("u").set_choice([2, 0, 1, 1, 0])
    assert (soft - export_task(model, "u")(x)).abs().max().item() < 1e-5


def test_a_soft_route_under_output_mixing_is_refused():
    net = ModularNet(ModelConfig(channels=8, num_modules=3, steps=2, mixing="output"), [TaskSpec("u", 3)]).eval()
    with pytest.raises(IsomodError, match="task 'u' has a soft route under output mixing"):
        export_task(net, "u")


def test_torchscript_runs_without_isomod(model, tmp_path):
    path = save_torchscript(export_task(model, "t"), tmp_path / "t.pt")
    x = torch.rand(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys; sys.modules['isomod'] = None\n"  # any import of isomod now fails
              "import torch\n"
              f"net = torch.jit.load({str(path)!r}); x = torch.load({str(tmp_path / 'x.pt')!r})\n"
              f"torch.save(net(x), {str(tmp_path / 'y.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (torch.load(tmp_path / "y.pt") - model(x, "t")).abs().max().item() < 1e-5


def test_onnx_runs_under_onnxruntime(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = save_onnx(export_task(model, "t"), tmp_path / "t.onnx", torch.rand(2, 1, 28, 28))
    session = ort.InferenceSession(str(path))
    x = torch.rand(5, 1, 28, 28)  # a batch size other than the example's
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - model(x, "t").detach().numpy()).max() < 1e-5


def test_export_command(model, tmp_path, capsys):
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    assert main(["export", "--from", str(ckpt), "--task", "t", "--out", str(tmp_path / "t.pt")]) == 0
    text = capsys.readouterr().out
    assert "route 0 1 0 2 0" in text and "3 distinct modules for 5 steps" in text and (tmp_path / "t.pt").exists()
    assert main(["export", "--from", str(ckpt), "--task", "u", "--out", str(tmp_path / "u.pt")]) == 0
    assert "(argmax of soft)" in capsys.readouterr().out and (tmp_path / "u.pt").exists()


def test_speed_bench_measures_every_method(tmp_path):
    from isomod.bench import speed

    config = speed.SpeedBenchConfig(modules=[2], tasks=[1, 2], model=ModelConfig(channels=8, steps=2),
                                    speed=speed.SpeedConfig(batch_size=8, image_size=12, warmup=1, repeats=2, device="cpu"))
    results = speed.run(tmp_path / "speed", config, progress=False)
    rows = results["rows"]
    for method in speed.TRAIN_METHODS:
        for t in (1, 2):
            assert speed.value(rows, method, 2, t, "train_img_per_s") > 0
            assert speed.value(rows, method, 2, t, "peak_mem_ratio_to_plain") > 0
        assert speed.value(rows, method, 2, 2, "multitask_time_ratio") > 0
    assert speed.value(rows, "plain", 2, 1, "train_time_ratio_to_plain") == 1.0
    # The grouped step does the loop's arithmetic: its multiply-adds are counted as the loop's.
    macs = {(r["method"], r["tasks"]): r["macs_per_step"] for r in rows if r["metric"] == "train_img_per_s"}
    assert macs[("grouped", 2)] == macs[("weight_mixing", 2)] and macs[("grouped", 1)] == macs[("weight_mixing", 1)]
    # Output mixing keeps every module's activations for backward: more memory than plain.
    assert speed.value(rows, "output_mixing", 2, 1, "peak_mem_ratio_to_plain") > 1.2
    assert speed.value(rows, "exported", 2, 1, "infer_time_ratio_to_plain") > 0
    assert speed.value(rows, "exported_templates", 2, 1, "infer_time_ratio_to_plain") > 0
    assert len(speed.checks(results)) == 7 and (tmp_path / "speed" / "speed.png").exists()
    assert "| exported / plain |" in (tmp_path / "speed" / "report.md").read_text()


def test_a_multitask_torchscript_file_serves_every_task_like_the_model(tmp_path):
    """Several tasks in one TorchScript file, the task an index input: the same logits as the
    model's mixed batch, read back without isomod; ONNX stays one task a file."""
    import json

    from isomod import ModelConfig, ModularNet, TaskSpec
    from isomod.cli import main
    from isomod.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = ModularNet(ModelConfig(channels=8, num_modules=4, steps=3), [TaskSpec("a", 3), TaskSpec("b", 5)]).eval()
    net.route("b").set_choice([1, 2, 0])
    ck = save_checkpoint(net, tmp_path / "ck")
    assert main(["export", "--from", str(ck), "--tasks", "a", "b", "--out", str(tmp_path / "ab.pt")]) == 0
    extra = {"isomod.json": ""}
    scripted = torch.jit.load(str(tmp_path / "ab.pt"), _extra_files=extra)
    meta = json.loads(extra["isomod.json"])
    assert meta["tasks"] == ["a", "b"] and len(meta["class_names"]["b"]) == 5
    x, index = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        mine, theirs = scripted(x, index), net(x, ["a", "b", "b", "a", "b", "a"])
    assert torch.allclose(mine.nan_to_num(0.0, neginf=0.0), theirs.nan_to_num(0.0, neginf=0.0), atol=1e-5)
    assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
    assert main(["export", "--from", str(ck), "--tasks", "a", "b", "--format", "onnx", "--out",
                 str(tmp_path / "ab.onnx")]) == 2
