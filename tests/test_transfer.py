"""Route-only transfer: a new task learns its route, norms and head on a frozen pool;
earlier tasks keep their exact outputs. Plus the Fashion-MNIST IDX loader."""

import gzip

import numpy as np
import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, TrainConfig, Trainer, load_checkpoint
from isomod.adapt import few_shot, fit_route
from isomod.cli import main
from isomod.data.tasks import load_task, read_idx

from conftest import write_npz


@pytest.fixture(scope="module")
def pretrained(digit_tasks):
    mnist = digit_tasks[0]
    torch.manual_seed(0)
    model = ModularNet(ModelConfig(channels=16, num_modules=4, steps=4), [mnist.spec])
    cfg = TrainConfig(steps=150, batch_size=32, lr=5e-3, lr_heads=5e-3, warmup_steps=10, checkpoint_every=0)
    Trainer(model, [mnist], cfg, progress=False).fit()
    return model


def test_route_only_transfer_learns_and_leaves_earlier_tasks_bit_identical(pretrained, digit_tasks, tmp_path):
    mnist, uci = digit_tasks
    x = mnist.x_test[:64].float() / 255
    before = pretrained.eval()(x, "mnist")
    shared = {k: v.clone() for k, v in pretrained.state_dict().items()}
    n_before = pretrained.param_count()
    cfg = TrainConfig(steps=200, batch_size=32, lr=5e-3, lr_heads=5e-3, warmup_steps=10, checkpoint_every=0)
    accs = fit_route(pretrained, uci, cfg, out_dir=tmp_path, init_from="mnist", progress=False)
    assert accs["uci-digits"] > 0.3, accs  # chance is 0.1; a tiny pool pre-trained for 150 steps
    assert pretrained.route("uci-digits").is_discrete
    for k, v in shared.items():
        assert torch.equal(v, pretrained.state_dict()[k]), k
    assert torch.equal(before, pretrained.eval()(x, "mnist"))
    added = pretrained.param_count() - n_before
    assert added == pretrained.task_param_count("uci-digits") and added < 0.1 * n_before
    loaded = load_checkpoint(tmp_path / "checkpoint").eval()
    assert loaded.task_names == ["mnist", "uci-digits"]
    assert torch.equal(before, loaded(x, "mnist"))


def test_transfer_errors(pretrained, digit_tasks, tmp_path):
    uci = digit_tasks[1]
    with pytest.raises(IsomodError, match="unknown task 'greek'; this model has: mnist"):
        fit_route(pretrained, uci, init_from="greek")
    rgb = load_task(str(write_npz(tmp_path / "rgb.npz", shape=(12, 12, 3))))
    with pytest.raises(IsomodError, match="task 'rgb' has 3-channel inputs; this model's stem takes 1"):
        fit_route(pretrained, rgb)


def test_few_shot(digit_tasks):
    uci = digit_tasks[1]
    five = few_shot(uci, 5, seed=1)
    assert torch.bincount(five.y_train).tolist() == [5] * 10
    assert torch.equal(five.x_test, uci.x_test)
    assert torch.equal(few_shot(uci, 5, seed=1).x_train, five.x_train)
    smallest = int(torch.bincount(uci.y_train).min())
    with pytest.raises(IsomodError, match=rf"--shots 999 is outside 1\.\.{smallest}: the smallest class"):
        few_shot(uci, 999)


def test_transfer_cli(tmp_path, capsys):
    a = str(write_npz(tmp_path / "a.npz", shape=(16, 16), seed=1))
    b = str(write_npz(tmp_path / "b.npz", shape=(16, 16), seed=2, classes=4))
    tiny = ["--batch-size", "8", "--warmup-steps", "1", "--no-progress"]
    assert main(["train", "--tasks", a, "--out", str(tmp_path / "pre"), "--steps", "4", "--model-channels", "8",
                 "--model-num-modules", "3", "--model-steps", "3", *tiny]) == 0
    assert main(["transfer", "--from", str(tmp_path / "pre" / "checkpoint"), "--task", b, "--shots", "3",
                 "--out", str(tmp_path / "tr"), "--steps", "4", *tiny]) == 0
    out = capsys.readouterr().out
    assert "b: " in out and "added" in out and "serves all 2 tasks" in out
    assert main(["transfer", "--from", str(tmp_path / "pre" / "checkpoint"), "--task", b, "--shots", "50",
                 "--out", str(tmp_path / "tr2"), *tiny]) == 2
    assert "--shots 50 is outside 1..10" in capsys.readouterr().err


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_loader(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (20, 28, 28)),
             "train-labels-idx1-ubyte.gz": np.arange(20) % 10,
             "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (10, 28, 28)),
             "t10k-labels-idx1-ubyte.gz": np.arange(10)}
    for name, arr in files.items():
        write_idx(tmp_path / name, arr)
    assert np.array_equal(read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.arange(10))
    monkeypatch.setenv("ISOMOD_DATA", str(tmp_path))
    from isomod.data import tasks

    t = tasks.fashion_mnist_task()
    assert t.spec.num_classes == 10 and t.x_train.shape == (20, 1, 28, 28) and t.spec.class_names[0] == "t-shirt"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(tasks, "fashion_dirs", lambda data_dir=None: [empty])
    with pytest.raises(IsomodError, match="Fashion-MNIST not found .* install Debian's dataset-fashion-mnist"):
        tasks.fashion_mnist_task()
