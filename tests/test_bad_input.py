"""Bad input as a new user feeds it: one line naming what was wrong and what is accepted,
nothing written and nothing lost."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from isomod import load_checkpoint
from isomod.io.checkpoint import recover
from isomod.cli import main

from conftest import image_folder, write_npz

TINY = ["--model-channels", "4", "--model-num-modules", "2", "--model-steps", "2", "--batch-size", "8",
        "--warmup-steps", "1", "--log-every", "1", "--no-progress"]


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("isomod: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def data(tmp_path):
    return str(write_npz(tmp_path / "d.npz", shape=(8, 8)))


@pytest.fixture
def trained(tmp_path, data):
    """A tiny run folder with a checkpoint and its trainer state."""
    run = tmp_path / "run"
    assert main(["train", "--tasks", data, "--out", str(run), "--steps", "2", *TINY]) == 0
    return run


@pytest.mark.parametrize("text, fragments", [
    ("train:\n  steps: abc\n", ["train steps: expected an integer, got 'abc'"]),
    ("train:\n  steps: 5.5\n", ["train steps: expected an integer, got 5.5"]),
    ("model:\n  channels: eight\n", ["model channels: expected an integer, got 'eight'"]),
    ("train:\n  lr: fast\n", ["train lr: expected a number, got 'fast'"]),
    ("train:\n  augment: maybe\n", ["train augment: expected true or false, got 'maybe'"]),
    ("train: 5\n", ["train: expected a mapping of steps, batch_size"]),
    ("- 1\n- 2\n", ["a config file holds a mapping"]),
    ("train: {steps: [1\n", ["cannot parse config (ParserError"]),
])
def test_config_values_of_the_wrong_type_are_refused_before_anything_is_written(tmp_path, data, capsys, text,
                                                                                 fragments):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    assert main(["train", "--tasks", data, "--out", str(out), "--config", str(cfg), "--no-progress"]) == 2
    one_line_error(capsys, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("option, fragment", [
    (["--lr", "-1"], "train config lr must be a finite number >= 0, got -1.0"),
    (["--lr-routes", "nan"], "train lr_routes: expected a finite number, got nan"),
    (["--steps", "0"], "train config steps must be >= 1, got 0"),
    (["--temperature-end", "0"], "train config temperature_end must be > 0"),
])
def test_out_of_range_options_are_refused(tmp_path, data, capsys, option, fragment):
    assert main(["train", "--tasks", data, "--out", str(tmp_path / "out"), *option, "--no-progress"]) == 2
    one_line_error(capsys, fragment)
    assert not (tmp_path / "out").exists()


def test_image_size_zero_is_refused(tmp_path, data, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--tasks", data, "--out", str(tmp_path / "o"), "--image-size", "0"])
    assert "expected a positive whole number, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["model"].update(channels=8.5), "model config channels: expected an integer, got 8.5"),
    (lambda c: c.update(routes=[0, 1]), "routes: expected a mapping, got [0, 1]"),
    (lambda c: c["tasks"][0].update(num_classes="three"), "tasks[0] num_classes: expected an integer"),
])
def test_a_checkpoint_config_of_the_wrong_type_is_refused(trained, capsys, edit, fragment):
    file = trained / "checkpoint" / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))
    assert main(["eval", "--from", str(trained / "checkpoint")]) == 2
    one_line_error(capsys, "cannot build the model", fragment)


def test_out_that_is_a_file_a_folder_or_unwritable(tmp_path, data, trained, capsys):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    assert main(["train", "--tasks", data, "--out", str(file), *TINY]) == 2
    one_line_error(capsys, "exists and is not a folder")
    assert main(["transfer", "--from", str(trained / "checkpoint"), "--task", data, "--out", str(file),
                 "--no-progress"]) == 2
    one_line_error(capsys, "exists and is not a folder")
    assert file.read_text() == "keep me"
    assert main(["train", "--tasks", data, "--out", "/proc/isomod-run", *TINY]) == 2
    one_line_error(capsys, "/proc/isomod-run")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    ck = str(trained / "checkpoint")
    assert main(["export", "--from", ck, "--task", "d", "--out", str(folder)]) == 2
    one_line_error(capsys, "is a folder; give a file name")
    assert main(["export", "--from", ck, "--task", "d", "--out", "/proc/isomod.pt"]) == 2
    one_line_error(capsys, "cannot write there")


@pytest.mark.parametrize("override, fragment", [
    ({"x_test": np.zeros((0, 8, 8), np.uint8), "y_test": np.zeros(0, np.int64)}, "x_test holds no images"),
    ({"x_train": np.zeros((0, 8, 8), np.uint8), "y_train": np.zeros(0, np.int64)}, "x_train holds no images"),
    ({"x_train": np.full((40, 8, 8), np.nan, np.float32)}, "pixel values are NaN or infinite"),
    ({"y_train": np.r_[np.arange(39) % 4, 1_000_000]}, "labels must be 0..K-1 with every class in y_train"),
])
def test_npz_contents_that_cannot_make_a_task(tmp_path, capsys, override, fragment):
    data = write_npz(tmp_path / "bad.npz", shape=(8, 8), **override)
    assert main(["train", "--tasks", str(data), "--out", str(tmp_path / "o"), *TINY]) == 2
    one_line_error(capsys, fragment)
    assert not (tmp_path / "o").exists()


def test_a_folder_with_train_but_no_test(tmp_path, capsys):
    image_folder(tmp_path / "imgs" / "train")
    assert main(["train", "--tasks", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), *TINY]) == 2
    one_line_error(capsys, "has a train/ folder but no test/ (or val/) folder")


@pytest.mark.parametrize("text, fragment", [
    ("not json {", "not a JSON file"),
    ("[1, 2]", "not a benchmark's results"),
    ('{"bench": "mtl", "rows": 5}', "not a benchmark's results"),
    ('{"bench": "nope", "rows": []}', "unknown benchmark 'nope'"),
    ('{"bench": "mtl", "rows": [], "config": {}}', "not what `isomod bench mtl` writes"),
])
def test_report_on_a_results_file_that_is_not_one(tmp_path, capsys, text, fragment):
    (tmp_path / "results.json").write_text(text)
    assert main(["report", str(tmp_path)]) == 2
    one_line_error(capsys, fragment)


def test_a_refused_resume_changes_nothing(trained, data, capsys):
    before = {p.name: p.read_bytes() for p in [trained / "train_config.json", *(trained / "checkpoint").iterdir()]}
    argv = ["train", "--tasks", data, "--out", str(trained), "--steps", "6", "--resume", *TINY]
    assert main([*argv, "--model-channels", "6"]) == 2
    one_line_error(capsys, "checkpoint model differs from this run's (channels: 4 in checkpoint vs 6")
    (trained / "checkpoint" / "trainer.pt").write_bytes(b"garbage")
    assert main(argv) == 2
    one_line_error(capsys, "refused: not a trainer state of tensors and plain values (corrupt")
    torch.save({"step": 1}, trained / "checkpoint" / "trainer.pt")
    assert main(argv) == 2
    one_line_error(capsys, "not an isomod trainer state (missing optimizer")
    after = {p.name: p.read_bytes() for p in [trained / "train_config.json", *(trained / "checkpoint").iterdir()]}
    assert after["train_config.json"] == before["train_config.json"]
    assert after["model.safetensors"] == before["model.safetensors"]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_trainer_state_that_carries_code_is_refused_and_runs_nothing(trained, data, tmp_path, capsys):
    marker = tmp_path / "ran"
    with open(trained / "checkpoint" / "trainer.pt", "wb") as f:
        pickle.dump({"step": 1, "payload": RunsCode(marker)}, f, protocol=2)
    assert main(["train", "--tasks", data, "--out", str(trained), "--steps", "4", "--resume", *TINY]) == 2
    one_line_error(capsys, "refused: not a trainer state of tensors and plain values")
    assert not marker.exists()


def test_a_kill_between_the_two_renames_is_recovered(trained, data, capsys):
    ck = trained / "checkpoint"
    expected = load_checkpoint(ck).state_dict()
    # The state a kill leaves after the first rename: the old copy aside, nothing in place,
    # plus a half-written new copy.
    os.replace(ck, trained / ".checkpoint.old-x1")
    (trained / ".checkpoint.tmp-x2").mkdir()
    (trained / ".checkpoint.tmp-x2" / "config.json").write_text("{")
    got = load_checkpoint(ck).state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert sorted(p.name for p in trained.iterdir() if p.name.startswith(".checkpoint")) == []
    # Resuming from it continues at its step, not from step 0.
    shutil.move(str(ck), str(trained / ".checkpoint.old-x3"))
    assert main(["train", "--tasks", data, "--out", str(trained), "--steps", "4", "--resume", "--extend", *TINY]) == 0
    assert '"event": "resume", "step": 2' in (trained / "log.jsonl").read_text()


def test_a_stale_old_copy_is_cleaned_and_folders_get_the_usual_mode(trained):
    ck = trained / "checkpoint"
    stale = trained / ".checkpoint.old-zz"
    shutil.copytree(ck, stale)
    recover(ck)
    assert not stale.exists() and ck.is_dir()
    umask = os.umask(0)
    os.umask(umask)
    assert ck.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_section_that_is_not_a_mapping_is_named_even_with_options_for_it(tmp_path, data, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: 5\n")
    assert main(["train", "--tasks", data, "--out", str(tmp_path / "o"), "--config", str(cfg), "--steps", "3"]) == 2
    one_line_error(capsys, "cfg.yaml train: expected a mapping of steps, batch_size")
