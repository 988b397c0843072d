"""A task as a small file (`isomod.core.task_file`): saved and loaded bit for bit, only onto
its own pool, and a hostile file refused before anything is added."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from isomod import IsomodError, ModelConfig, ModularNet, TaskSpec, load_checkpoint, save_checkpoint


def pool(block="conv", seed=0):
    torch.manual_seed(seed)
    extra = {"block": "transformer", "channels": 8, "heads": 2, "stem_stride": 4, "image_size": 12} \
        if block == "transformer" else {"channels": 8}
    specs = [TaskSpec("a", 3, (1, 12, 12)), TaskSpec("b", 4, (1, 12, 12)),
             TaskSpec("d1", 5, (1, 12, 12), label_space="digits"), TaskSpec("d2", 5, (1, 12, 12), label_space="digits")]
    net = ModularNet(ModelConfig(num_modules=4, steps=3, **extra), specs).eval()
    with torch.no_grad():  # every task its own norms and head values, not the initial ones
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.route("b").set_choice([1, 2, 3])
    return net


@pytest.mark.parametrize("block", ["conv", "transformer"])
@pytest.mark.parametrize("task", ["a", "b", "d2"])  # soft route, discrete route, a domain of a shared head
def test_a_task_file_round_trips_bit_for_bit_and_leaves_every_other_task_alone(tmp_path, block, task):
    net = pool(block)
    x = torch.rand(3, 1, 12, 12)
    outputs = {t: net(x, t) for t in net.task_names}
    net.save_task(task, tmp_path / "t")
    other = pool(block)  # the same pool, another copy: the task is not there yet
    other.remove_task(task)
    before = {t: other(x, t) for t in other.task_names}
    assert other.load_task(tmp_path / "t") == task
    assert torch.equal(other(x, task), outputs[task])
    assert all(torch.equal(other(x, t), before[t]) for t in before)
    assert other.route(task).is_discrete == net.route(task).is_discrete
    meta = json.loads((tmp_path / "t" / "task.json").read_text())
    assert meta["pool_fingerprint"] == net.pool_fingerprint() and meta["task"]["name"] == task
    stored = load_file(tmp_path / "t" / "task.safetensors")
    assert meta["numbers"] == sum(t.numel() for t in stored.values() if t.is_floating_point())
    assert ("shared_head.weight" in stored) == (task == "d2")


def test_a_task_from_another_pool_is_refused_naming_both_pools(tmp_path):
    net, other = pool(seed=0), pool(seed=1)
    net.save_task("a", tmp_path / "t", base="runs/x/checkpoint")
    other.remove_task("a")
    with pytest.raises(IsomodError, match=rf"belongs to the pool {net.pool_fingerprint()[:16]} \(saved from "
                                          rf"runs/x/checkpoint\); this model's pool is {other.pool_fingerprint()[:16]}"):
        other.load_task(tmp_path / "t")
    assert "a" not in other.task_names
    grown = pool()
    grown.remove_task("a")
    grown.add_modules(1)  # the same pool grown by a module is another pool
    with pytest.raises(IsomodError, match="belongs to the pool"):
        grown.load_task(tmp_path / "t")


def hostile(tmp_path, change):
    net = pool()
    folder = net.save_task("a", tmp_path / "t")
    tensors, meta = load_file(folder / "task.safetensors"), json.loads((folder / "task.json").read_text())
    change(tensors, meta)
    save_file(tensors, folder / "task.safetensors")
    (folder / "task.json").write_text(json.dumps(meta))
    net.remove_task("a")
    return net, folder


def nan(t, m):
    t["branch.norms.affine"][0] = float("nan")


def inf(t, m):
    t["branch.head.bias"][1] = float("inf")


def half(t, m):
    t["branch.route.logits"] = t["branch.route.logits"].half()


def missing(t, m):
    del t["branch.norms.stats"]


def extra(t, m):
    t["branch.secret"] = torch.zeros(3)


def shape(t, m):
    t["branch.head.weight"] = torch.zeros(7, 8)
    t["branch.head.bias"] = torch.zeros(7)


def classes(t, m):
    m["task"]["num_classes"] = 9


def declared(t, m):
    m["tensors"]["branch.head.weight"]["shape"] = [4, 8]


def fmt(t, m):
    m["format"] = 99


@pytest.mark.parametrize("change, message", [
    (nan, "branch.norms.affine holds values that are not finite"),
    (inf, "branch.head.bias holds values that are not finite"),
    (half, r"branch.route.logits is torch.float16 \(3, 4\); a task of this pool holds torch.float32 \(3, 4\)"),
    (missing, r"missing: branch.norms.stats; unexpected: none"),
    (extra, r"missing: none; unexpected: branch.secret"),
    (shape, r"branch.head.weight is torch.float32 \(7, 8\); a task of this pool holds torch.float32 \(3, 8\)"),
    (classes, r"branch.head.weight is torch.float32 \(3, 8\); a task of this pool holds torch.float32 \(9, 8\)"),
    (declared, r"says branch.head.weight has shape \[4, 8\]; the tensor has \[3, 8\]"),
    (fmt, "task file format 99; this isomod reads format 1"),
])
def test_a_hostile_task_file_is_refused_and_nothing_is_added(tmp_path, change, message):
    net, folder = hostile(tmp_path, change)
    before = dict(net.state_dict())
    with pytest.raises(IsomodError, match=message):
        net.load_task(folder)
    assert "a" not in net.task_names and net.state_dict().keys() == before.keys()


def test_files_that_are_not_a_task_and_a_task_already_there_are_refused(tmp_path):
    net = pool()
    folder = net.save_task("a", tmp_path / "t")
    with pytest.raises(IsomodError, match="already has a task 'a'"):
        net.load_task(folder)
    (folder / "task.json").write_text("{not json")
    net.remove_task("a")
    with pytest.raises(IsomodError, match="task.json: not JSON"):
        net.load_task(folder)
    with pytest.raises(IsomodError, match="not a task folder"):
        net.load_task(tmp_path / "nothing")
    net2 = pool()
    folder = net2.save_task("a", tmp_path / "u")
    (folder / "task.safetensors").write_bytes(b"\x00" * 20)
    net2.remove_task("a")
    with pytest.raises(IsomodError, match="not a safetensors file"):
        net2.load_task(folder)


def test_a_domain_whose_shared_head_differs_is_refused(tmp_path):
    net = pool()
    net.save_task("d2", tmp_path / "t")
    other = pool()
    other.remove_task("d2")
    with torch.no_grad():
        other.heads["digits"].bias.add_(1.0)
    with pytest.raises(IsomodError, match="head for label space 'digits' differs"):
        other.load_task(tmp_path / "t")
    assert "d2" not in other.task_names


def test_a_task_file_is_a_small_part_of_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = ModularNet(ModelConfig(channels=32, num_modules=16, steps=8), [TaskSpec(f"t{i}", 10) for i in range(3)])
    ck = save_checkpoint(net, tmp_path / "ck")
    folder = net.save_task("t1", tmp_path / "t", base=str(ck))
    task_bytes = sum(p.stat().st_size for p in folder.iterdir())
    ck_bytes = sum(p.stat().st_size for p in ck.iterdir())
    assert task_bytes < 0.02 * ck_bytes, (task_bytes, ck_bytes)
    loaded = load_checkpoint(ck)
    loaded.remove_task("t1")
    assert loaded.load_task(folder) == "t1"


def test_task_files_on_the_command_line(tmp_path, capsys):
    from conftest import write_npz as npz
    from isomod.cli import main

    a = str(npz(tmp_path / "a.npz", shape=(16, 16), seed=1))
    b = str(npz(tmp_path / "b.npz", shape=(16, 16), seed=2, classes=4))
    tiny = ["--batch-size", "8", "--warmup-steps", "1", "--no-progress"]
    assert main(["train", "--tasks", a, "--out", str(tmp_path / "pre"), "--steps", "3", "--model-channels", "8",
                 "--model-num-modules", "3", "--model-steps", "3", *tiny]) == 0
    pool_ck = tmp_path / "pre" / "checkpoint"
    assert main(["transfer", "--from", str(pool_ck), "--task", b, "--out", str(tmp_path / "tr"), "--steps", "3",
                 *tiny]) == 0
    out = capsys.readouterr().out
    assert f"task file: {tmp_path / 'tr' / 'task'} (" in out and "% of the checkpoint's" in out
    # the task file on the pool it was learned on: eval, predict and export take it with --from
    assert main(["eval", "--from", str(pool_ck), "--task-file", str(tmp_path / "tr" / "task")]) == 0
    evaluated = capsys.readouterr().out
    assert evaluated.startswith("b: test acc") and evaluated.count("test acc") == 1
    transferred = load_checkpoint(tmp_path / "tr" / "checkpoint")
    assert main(["eval", "--from", str(tmp_path / "tr"), "--tasks", "b"]) == 0
    assert capsys.readouterr().out.split("   ")[0] == evaluated.split("   ")[0]  # the same accuracy either way
    assert main(["export", "--from", str(pool_ck), "--task-file", str(tmp_path / "tr" / "task"), "--out",
                 str(tmp_path / "b.pt")]) == 0 and (tmp_path / "b.pt").stat().st_size > 0
    # predict: several tasks in one call, one per input, served in one batch
    from PIL import Image

    img = tmp_path / "one.png"
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(img)
    capsys.readouterr()
    assert main(["predict", "--from", str(pool_ck), "--task-file", str(tmp_path / "tr" / "task"), str(img), str(img),
                 "--json", "--tasks", "a", "b"]) == 0
    both_tasks = json.loads(capsys.readouterr().out)
    assert [p["task"] for p in both_tasks] == ["a", "b"]
    for p in both_tasks:  # the same as predicting each under its own task alone
        assert main(["predict", "--from", str(pool_ck), "--task-file", str(tmp_path / "tr" / "task"), "--task",
                     p["task"], str(img), "--json"]) == 0
        alone = json.loads(capsys.readouterr().out)[0]["top"]
        assert [c["class"] for c in alone] == [c["class"] for c in p["top"]]
        assert all(abs(x["p"] - y["p"]) < 1e-4 for x, y in zip(alone, p["top"]))
    assert main(["predict", "--from", str(pool_ck), str(img), str(img), "--tasks", "a"]) == 2
    assert "one task per image or folder: 1 tasks for 2 inputs" in capsys.readouterr().err
    # isomod task: list, add to a new checkpoint, remove; the --from checkpoint never changes
    assert main(["task", "list", "--from", str(pool_ck)]) == 0
    assert "pool " in capsys.readouterr().out
    assert main(["task", "add", str(tmp_path / "tr" / "task"), "--from", str(pool_ck), "--out",
                 str(tmp_path / "both")]) == 0
    both = load_checkpoint(tmp_path / "both")
    assert both.task_names == ["a", "b"] and both.pool_fingerprint() == transferred.pool_fingerprint()
    assert load_checkpoint(pool_ck).task_names == ["a"]
    assert main(["task", "remove", "a", "--from", str(tmp_path / "both"), "--out", str(tmp_path / "only-b")]) == 0
    assert load_checkpoint(tmp_path / "only-b").task_names == ["b"]
    capsys.readouterr()
    assert main(["task", "add", str(tmp_path / "tr" / "task"), "--from", str(tmp_path / "only-b"), "--out",
                 str(tmp_path / "again")]) == 2
    assert "already has a task 'b'" in capsys.readouterr().err
    assert main(["task", "remove", "a", "--from", str(pool_ck), "--out", str(tmp_path / "both")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # scratch changes the pool: no task file
    assert main(["transfer", "--from", str(pool_ck), "--task", b, "--method", "scratch", "--out",
                 str(tmp_path / "sc"), "--steps", "2", *tiny]) == 0
    assert "no task file: this method changed the pool" in capsys.readouterr().out
    assert not (tmp_path / "sc" / "task").exists()
