"""Save/load round trips and what a bad checkpoint does (a clear error, files untouched)."""

import json

import pytest
import torch

from isomod import (CheckpointError, IndependentNets, ModelConfig, ModularNet, PlainResNet, TaskSpec,
                    load_checkpoint, save_checkpoint)
from isomod.io.checkpoint import check_compatible


def tiny(cls=ModularNet):
    torch.manual_seed(0)
    return cls(ModelConfig(channels=8, num_modules=3, steps=4), [TaskSpec("a", 4), TaskSpec("b", 3)])


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("cls", [ModularNet, PlainResNet, IndependentNets])
def test_save_load_bit_identical(tmp_path, cls):
    model = tiny(cls)
    x = torch.randn(5, 1, 28, 28)
    model.train()
    model(x, "a")  # move BN running statistics away from their initial values
    model.eval()
    if cls is ModularNet:
        model.route("a").discretize()
    path = save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(path).eval()
    assert type(loaded) is cls
    for t in ("a", "b"):
        assert torch.equal(model(x, t), loaded(x, t))
    if cls is ModularNet:
        assert loaded.route("a").is_discrete and not loaded.route("b").is_discrete
        assert json.loads((path / "config.json").read_text())["routes"]["a"] == model.route("a").indices()


def test_module_owned_norms_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ModularNet(ModelConfig(channels=8, num_modules=3, steps=4, norm_affine="module"), [TaskSpec("a", 4)])
    with torch.no_grad():
        for p in model.pool.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(5, 1, 28, 28)
    model.train()
    model(x, "a")
    model.eval()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ck")).eval()
    assert loaded.config.norm_affine == "module" and loaded.pool.norm_affine
    assert torch.equal(loaded.pool.blocks[2].g2, model.pool.blocks[2].g2)
    assert torch.equal(model(x, "a"), loaded(x, "a"))


def test_save_load_keeps_pool_changes(tmp_path):
    model = tiny()
    model.route("a").set_choice([0, 1, 1, 0])
    model.route("b").set_choice([1, 0, 0, 1])
    model.remove_module(2)
    model.add_modules(2)
    model.pool.freeze([0])
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ck"))
    assert len(loaded.pool) == 4 and loaded.pool.frozen() == [True, False, False, False]
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model.eval()(x, "a"), loaded.eval()(x, "a"))


def test_corrupt_weights_give_clear_error_and_stay_untouched(tmp_path):
    path = save_checkpoint(tiny(), tmp_path / "ck")
    (path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    before = snapshot(path)
    with pytest.raises(CheckpointError, match="corrupt weights file"):
        load_checkpoint(path)
    assert snapshot(path) == before


def test_corrupt_config_and_missing_folder(tmp_path):
    path = save_checkpoint(tiny(), tmp_path / "ck")
    (path / "config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_weights_from_another_config_are_rejected(tmp_path):
    a = save_checkpoint(tiny(), tmp_path / "a")
    other = ModularNet(ModelConfig(channels=16, num_modules=3, steps=4), [TaskSpec("a", 4), TaskSpec("b", 3)])
    b = save_checkpoint(other, tmp_path / "b")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    before = snapshot(a)
    with pytest.raises(CheckpointError, match="do not match the model's config"):
        load_checkpoint(a)
    assert snapshot(a) == before
    with pytest.raises(CheckpointError, match="model differs"):
        check_compatible(other, tmp_path / "a")


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    model = tiny()
    path = save_checkpoint(model, tmp_path / "ck")
    before = snapshot(path)
    with pytest.raises(Exception):
        save_checkpoint(model, path, trainer_state={"fn": lambda: None})  # cannot be pickled
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    import os

    from isomod.files import write_atomic

    write_atomic(tmp_path / "atomic.json", lambda f: f.write(b"{}"))
    (tmp_path / "plain.json").write_bytes(b"{}")
    assert os.stat(tmp_path / "atomic.json").st_mode == os.stat(tmp_path / "plain.json").st_mode
