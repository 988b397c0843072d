"""The `isomod` command end to end on tiny configs, and its one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from isomod import load_checkpoint
from isomod.cli import main

from conftest import write_npz

TINY = ["--model-channels", "8", "--model-num-modules", "3", "--model-steps", "3", "--batch-size", "16",
        "--warmup-steps", "2", "--log-every", "2", "--no-progress"]
TINY_BENCH = [a for i, a in enumerate(TINY) if a != "--model-num-modules" and TINY[i - 1] != "--model-num-modules"]


def test_tasks_lists_suites(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "glyphs: glyphs/latin_upper" in out and "uci-digits" in out


def test_train_eval_and_resume_on_a_user_npz(tmp_path, capsys):
    data = str(write_npz(tmp_path / "mine.npz", shape=(16, 16)))
    run = tmp_path / "run"
    assert main(["train", "--tasks", data, "--out", str(run), "--steps", "8", *TINY]) == 0
    out = capsys.readouterr().out
    assert "mine: " in out and "test acc" in out
    assert json.loads((run / "train_config.json").read_text())["steps"] == 8
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert config["model"]["channels"] == 8 and len(config["routes"]["mine"]) == 3
    assert main(["train", "--tasks", data, "--out", str(run), "--steps", "12", "--resume", "--extend", *TINY]) == 0
    assert '"event": "resume", "step": 8, "extension": "extending the run from 8 to 12 steps' in \
        (run / "log.jsonl").read_text()
    assert main(["eval", "--from", str(run / "checkpoint")]) == 0
    assert "mine: test acc" in capsys.readouterr().out
    assert main(["eval", "--from", str(run / "checkpoint"), "--split", "train", "--limit", "7", "--diagnostics"]) == 0
    out = capsys.readouterr().out
    assert "mine: train acc" in out and "route distance 0.000" in out and "steps shuffled 0." in out
    acc = float(out.split("mine: train acc ")[1].split()[0])
    assert abs(acc * 7 - round(acc * 7)) < 1e-3  # on 7 images


def test_train_twice_with_one_seed_gives_identical_weights(tmp_path):
    data = str(write_npz(tmp_path / "mine.npz", shape=(16, 16)))
    for run in ("a", "b"):
        assert main(["train", "--tasks", data, "--out", str(tmp_path / run), "--steps", "3", "--seed", "5", *TINY]) == 0
    a, b = (load_checkpoint(tmp_path / run / "checkpoint").state_dict() for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  channels: 8\n  num_modules: 2\n  steps: 2\ntrain:\n  steps: 3\n  batch_size: 8\n")
    data = str(write_npz(tmp_path / "d.npz"))
    assert main(["train", "--tasks", data, "--out", str(tmp_path / "r"), "--config", str(cfg), "--steps", "4",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "train_config.json").read_text())["steps"] == 4
    assert json.loads((tmp_path / "r" / "checkpoint" / "config.json").read_text())["model"]["num_modules"] == 2


@pytest.mark.parametrize("argv, message", [
    (["train", "--tasks", "glyphs/klingon", "--out", "x"], "unknown task 'glyphs/klingon'; known suites: glyphs, digits, digits5, mnistc; known tasks:"),
    (["report", "."], "results.json not found: run a benchmark with --out . first"),
    (["eval", "--from", "x", "--limit", "-1"], "--limit must be >= 0 (0: every image), got -1"),
    (["eval", "--from", "does-not-exist"], "does-not-exist: not a checkpoint folder"),
    (["train", "--tasks", "mnist", "--out", "x", "--schedule", "wavy"], "unknown schedule 'wavy'"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("isomod: error: ") and message in err and err.count("\n") == 1


def test_unknown_benchmark_and_config_section(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "nope", "--out", "x"])
    assert "invalid choice: 'nope' (choose from 'mtl', 'transfer', 'continual', 'adapt', 'reuse', 'speed', 'serve')" in capsys.readouterr().err
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("grow:\n  threshold: 0.5\n")
    assert main(["train", "--tasks", "mnist", "--out", str(tmp_path / "r"), "--config", str(cfg)]) == 2
    assert "cfg.yaml: unknown keys ['grow']; known: ['model', 'train']" in capsys.readouterr().err


def test_bad_npz_through_the_cli(tmp_path, capsys):
    data = write_npz(tmp_path / "bad.npz", y_train=None)
    assert main(["train", "--tasks", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "bad.npz: missing array(s) y_train" in capsys.readouterr().err


def test_help_documents_every_option_with_the_command_s_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "mtl", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model-num-modules" not in text and "--seed " not in text  # set by each regime / per run
    assert "--modules INT pool size of every modular method" in text
    assert "--steps INT optimiser steps. (default 10000)" in text
    with pytest.raises(SystemExit):
        main(["bench", "continual", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model-num-modules INT pool size `N`. (default 4)" in text and "(default 500)" in text
    assert "as isometric networks do). (default 4)" in text  # 4x4 patches, as bench transfer
    assert "--grow-threshold FLOAT validation accuracy a route over the frozen pool must reach" in text
    with pytest.raises(SystemExit):
        main(["bench", "transfer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--pretrain-steps INT optimiser steps. (default 7500)" in text and "(default 400)" in text
    assert "one pre-training and one set of transfer runs per seed. (default 0 1 2)" in text
    with pytest.raises(SystemExit):
        main(["bench", "reuse", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "pool sizes N. (default 4)" in text and "(default 1 2)" in text and "(default 3000)" in text
    assert "one run per seed. (default 0 1 2)" in text and "as isometric networks do). (default 4)" in text
    with pytest.raises(SystemExit):
        main(["transfer", "--help"])
    assert "optimiser steps. (default 600)" in " ".join(capsys.readouterr().out.split())


def test_import_isomod_leaves_matplotlib_alone():
    code = "import sys, isomod, isomod.cli, isomod.bench; isomod.bench.registry(); print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_every_registered_bench_gets_its_command_from_its_config(capsys):
    from isomod.bench import registry

    for name, bench in registry().items():
        with pytest.raises(SystemExit):
            main(["bench", name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        first = next(iter(bench.config.__dataclass_fields__))
        assert f"--{first.replace('_', '-')}" in text and "--config CONFIG" in text, name


def test_bench_options_are_type_checked_from_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("seeds: [0, a]\n")
    assert main(["bench", "mtl", "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "cfg.yaml seeds[1]: expected an integer, got 'a'" in capsys.readouterr().err
    cfg.write_text("methods: [modular, mixture]\n")
    assert main(["bench", "mtl", "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    from isomod.bench.mtl import METHODS

    assert f"unknown mtl method 'mixture'; known: {', '.join(METHODS)}" in capsys.readouterr().err
    assert {"modular", "modular_templates", "independent", "shared_trunk"} <= set(METHODS)
    assert not (tmp_path / "o").exists()
