"""Route-only transfer: a new task learns its route, norms and head on a frozen pool;
earlier tasks keep their exact outputs. Plus the Fashion-MNIST IDX loader."""

import copy
import gzip

import numpy as np
import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, TaskSpec, TrainConfig, Trainer, load_checkpoint
from isomod.methods.transfer import TRANSFER, TRANSFER_METHODS, few_shot, fit_route, select_source, transfer
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
    accs = fit_route(pretrained, uci, cfg, out_dir=tmp_path, source="mnist", progress=False)
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
        fit_route(pretrained, uci, source="greek")
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
    assert "b: test acc" in out and "added" in out and "holds 2 task(s)" in out and "(started from task a)" in out
    assert load_checkpoint(tmp_path / "tr" / "checkpoint").task_names == ["a", "b"]
    rgb = str(write_npz(tmp_path / "rgb.npz", shape=(16, 16, 3)))
    for extra, message in [(["--task", b, "--shots", "50"], "--shots 50 is outside 1..10: the smallest class"),
                           (["--task", b, "--source", "greek"], "unknown task 'greek'; this model has: a"),
                           (["--task", rgb], "rgb.npz holds 3x16x16 images; this model's tasks take 1x16x16")]:
        assert main(["transfer", "--from", str(tmp_path / "pre" / "checkpoint"), *extra,
                     "--out", str(tmp_path / "tr2"), *tiny]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "tr2").exists()
    assert main(["transfer", "--from", str(tmp_path / "pre" / "checkpoint"), "--task", b, "--method", "scratch",
                 "--out", str(tmp_path / "tr3"), "--steps", "4", *tiny]) == 0
    assert load_checkpoint(tmp_path / "tr3" / "checkpoint").task_names == ["b"]


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
    monkeypatch.delenv("ISOMOD_DATA")
    mine = tmp_path / "mine" / "fashion-mnist"  # --data-dir is looked in first, sub-folder included
    mine.mkdir(parents=True)
    for name, arr in files.items():
        write_idx(mine / name, arr[:10])
    assert load_task("fashion-mnist", data_dir=str(tmp_path / "mine")).x_train.shape == (10, 1, 28, 28)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(tasks, "fashion_dirs", lambda data_dir=None: [empty])
    with pytest.raises(IsomodError, match="Fashion-MNIST not found .* install Debian's dataset-fashion-mnist"):
        tasks.fashion_mnist_task()


def mnist_only(pretrained):
    """A copy of the pre-trained model with only its pre-training task (other tests add tasks)."""
    model = copy.deepcopy(pretrained)
    for name in model.task_names[1:]:
        model.remove_task(name)
    return model


def test_every_transfer_method_learns_and_counts_what_it_added(pretrained, digit_tasks):
    mnist, uci = digit_tasks
    pretrained = mnist_only(pretrained)
    x = mnist.x_test[:32].float() / 255
    before = pretrained.eval()(x, "mnist")
    cfg = TrainConfig(steps=60, batch_size=32, lr=5e-3, lr_heads=5e-3, warmup_steps=5, checkpoint_every=0)
    added = {}
    for method in TRANSFER_METHODS:
        model = copy.deepcopy(pretrained)
        result = transfer(model, uci, method, cfg, source="mnist", progress=False)
        assert result.test_acc > 0.2, (method, result.test_acc)  # chance is 0.1
        added[method] = result.params_task
        if method == "finetune":  # trains a copy: the model handed in is untouched
            assert result.model is not model and "uci-digits" not in model.specs
        if method not in ("finetune", "scratch"):  # in place, earlier tasks unchanged
            assert result.model is model and torch.equal(before, model.eval()(x, "mnist"))
        if TRANSFER[method].learns_route:
            assert result.route_steps_changed == sum(
                a != b for a, b in zip(model.route("uci-digits").indices(), model.route("mnist").indices()))
        else:
            assert result.route_steps_changed is None
        if method == "route_head":  # the source's norms, statistics included, as they were
            for a, b in zip(model.branch("uci-digits").norms, pretrained.branch("mnist").norms):
                assert torch.equal(a.weight, b.weight) and torch.equal(a.running_var, b.running_var)
    branch = result.model.branch("uci-digits")  # the last method is scratch: a fresh one-task network
    assert result.model.task_names == ["uci-digits"] and added["scratch"] == result.model.param_count()
    head = sum(p.numel() for p in branch.head.parameters())
    norms = sum(p.numel() for p in branch.norms.parameters())
    assert added["head_only"] == head and added["norm_head"] == head + norms
    assert added["route_only"] == head + norms + branch.route.logits.numel()
    assert added["route_head"] == head + branch.route.logits.numel()
    stats = sum(b.numel() for n, b in branch.norms.named_buffers() if "running" in n)
    assert added["stats_head"] == head + stats and added["route_search"] == head + stats + branch.route.steps
    assert added["finetune"] == head + norms + sum(p.numel() for p in pretrained.stem.parameters()) + \
        sum(p.numel() for p in pretrained.pool.parameters())


def test_head_only_keeps_the_source_norm_statistics(pretrained, digit_tasks):
    """A linear probe trains on the frozen features it is tested on: its norms, copied from
    the source task and frozen, must not update their running statistics in training."""
    cfg = TrainConfig(steps=20, batch_size=32, warmup_steps=2, checkpoint_every=0)
    pretrained = mnist_only(pretrained)
    result = transfer(copy.deepcopy(pretrained), digit_tasks[1], "head_only", cfg, source="mnist", progress=False)
    new, old = result.model.branch("uci-digits").norms, pretrained.branch("mnist").norms
    for a, b in zip(new, old):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    assert result.model.route("uci-digits").indices() == pretrained.route("mnist").indices()


@pytest.mark.parametrize("method", ["route_head", "head_only", "fit_route"])
def test_a_transfer_run_depends_on_its_seed_not_on_what_ran_before(pretrained, digit_tasks, method):
    """A new head's initial weights come from the run's seed: two runs with the same seed
    end with the same weights whatever the global random state was before each."""
    cfg = TrainConfig(steps=5, batch_size=32, warmup_steps=1, checkpoint_every=0, seed=3)
    heads = []
    for state in (1, 2):
        model = mnist_only(pretrained)
        torch.manual_seed(state)
        if method == "fit_route":
            fit_route(model, digit_tasks[1], cfg, source="mnist", progress=False)
        else:
            transfer(model, digit_tasks[1], method, cfg, source="mnist", progress=False)
        heads.append(model.branch("uci-digits").head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


@pytest.fixture(scope="module")
def soft_pretrained(digit_tasks):
    """A model of the template regime: soft route, norms' affine parameters in the modules."""
    from isomod.training.regimes import REGIMES

    mnist = digit_tasks[0]
    model_cfg, train_cfg = REGIMES["templates_norms"].apply(
        ModelConfig(channels=16, steps=4), TrainConfig(steps=100, batch_size=32, lr=5e-3, lr_heads=5e-3,
                                                       warmup_steps=10, checkpoint_every=0))
    torch.manual_seed(0)
    model = ModularNet(model_cfg, [mnist.spec])
    Trainer(model, [mnist], train_cfg, progress=False).fit()
    return model.eval()


@pytest.mark.parametrize("method", ["head_only", "norm_head", "route_head"])
def test_a_soft_source_route_is_kept_soft(soft_pretrained, digit_tasks, method):
    """The baselines run the source's soft route itself (not its argmax); a route method
    starts from it and moves it. With statistics-only step norms, only a linear probe
    keeps the source's statistics."""
    source = soft_pretrained.route("mnist")
    assert not source.is_discrete and len(soft_pretrained.pool) == 2
    cfg = TrainConfig(steps=30, batch_size=32, lr=5e-2, lr_heads=5e-2, warmup_steps=2, checkpoint_every=0,
                      routes="soft")
    result = transfer(copy.deepcopy(soft_pretrained), digit_tasks[1], method, cfg, source="mnist", progress=False)
    new = result.model.route("uci-digits")
    assert not new.is_discrete
    moved = (new.weights() - source.weights()).abs().max().item()
    if method == "route_head":
        assert moved > 1e-3 and result.route_change == pytest.approx(
            0.5 * (new.weights() - source.weights()).abs().sum(-1).mean().item(), abs=1e-5)
        assert result.params_task == new.logits.numel() + sum(p.numel() for p in result.model.head_of("uci-digits").parameters())
    else:
        assert moved == 0 and result.route_change is None
    stats_kept = [torch.equal(a.running_mean, b.running_mean) for a, b in
                  zip(result.model.branch("uci-digits").norms[:-1], soft_pretrained.branch("mnist").norms[:-1])]
    assert all(stats_kept) == (method == "head_only")


def test_select_source_prefers_the_task_whose_features_separate_the_classes(pretrained, digit_tasks):
    model = mnist_only(pretrained)
    model.add_task(TaskSpec("blind", 10, (1, 28, 28)))
    model.route("blind").set_choice(model.route("mnist").indices())
    final = model.branch("blind").norms[-1]
    with torch.no_grad():  # every feature is relu(0) = 0: nothing to separate classes with
        final.weight.zero_()
        final.bias.zero_()
    best, scores = select_source(model, digit_tasks[1])
    assert best == "mnist" and set(scores) == {"mnist", "blind"}
    assert scores["mnist"] > 0.5 > scores["blind"]
    with pytest.raises(IsomodError, match="unknown transfer method 'magic'; known: route_only, route_head, head_only"):
            transfer(model, digit_tasks[1], "magic")


def test_the_report_pairs_runs_by_task_shots_and_seed():
    # route_head beats head_only by 4 points on seed 0 and loses 1 on seed 1 (two tasks);
    # finetune is present on `all` only; a run without its partner is left out.
    from isomod.bench.transfer import comparisons, markdown_table, paired_gaps

    def row(method, task, shots, seed, value):
        return {"method": method, "task": task, "metric": "test_acc", "value": value, "shots": shots, "seed": seed,
                "params_task": 10, "params_total": 110}

    rows = []
    for seed, gap in ((0, 0.04), (1, -0.01)):
        for task in ("a", "b"):
            rows += [row("head_only", task, "all", seed, 0.80), row("route_head", task, "all", seed, 0.80 + gap),
                     row("route_only", task, "all", seed, 0.90), row("finetune", task, "all", seed, 0.95)]
    rows.append(row("route_head", "a", 10, 0, 0.5))  # no head_only run to pair it with
    g = paired_gaps(rows, "route_head", "head_only", "all")
    assert g["runs"] == 4 and g["ahead"] == 2
    assert g["mean"] == pytest.approx(0.015) and g["per_seed"] == pytest.approx({0: 0.04, 1: -0.01})
    assert paired_gaps(rows, "route_head", "head_only", 10) is None
    results = {"config": {"shots": [10, "all"], "methods": ["route_head", "head_only", "route_only", "finetune"]},
               "rows": rows, "pretrain": {"s0": {"params": 100}}}
    text = comparisons(results)
    assert "| route_head - head_only | all | +1.5 | -1.0 to +4.0 | 2 of 4 |" in text
    assert "| route_only - finetune | all | -5.0 | -5.0 to -5.0 | 0 of 4 |" in text
    assert "route_head - head_only | 10" not in text
    assert "a 94.7%, b 94.7%; mean 94.7%." in text
    table = markdown_table(results)
    assert "| a | all | 81.5 (5.0) | 80.0 (0.0) | 90.0 (0.0) | **95.0** (0.0) |" in table
