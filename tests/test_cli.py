"""The `isomod` command end to end on tiny configs, and its one-line errors."""

import json
import subprocess
import sys

import pytest

from isomod.cli import main

from conftest import write_npz

TINY = ["--model-channels", "8", "--model-num-modules", "3", "--model-steps", "3", "--batch-size", "16",
        "--warmup-steps", "2", "--log-every", "2", "--no-progress"]


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
    assert main(["train", "--tasks", data, "--out", str(run), "--steps", "12", "--resume", *TINY]) == 0
    assert '"event": "resume", "step": 8' in (run / "log.jsonl").read_text()
    assert main(["eval", "--from", str(run / "checkpoint")]) == 0
    assert "mine: test acc" in capsys.readouterr().out


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  channels: 8\n  num_modules: 2\n  steps: 2\ntrain:\n  steps: 3\n  batch_size: 8\n")
    data = str(write_npz(tmp_path / "d.npz"))
    assert main(["train", "--tasks", data, "--out", str(tmp_path / "r"), "--config", str(cfg), "--steps", "4",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "train_config.json").read_text())["steps"] == 4
    assert json.loads((tmp_path / "r" / "checkpoint" / "config.json").read_text())["model"]["num_modules"] == 2


@pytest.mark.parametrize("argv, message", [
    (["train", "--tasks", "glyphs/klingon", "--out", "x"], "unknown task 'glyphs/klingon'; known suites: glyphs, digits; known tasks:"),
    (["bench", "nope", "--out", "x"], "unknown benchmark 'nope'; known: mtl"),
    (["eval", "--from", "does-not-exist"], "does-not-exist: not a checkpoint folder"),
    (["train", "--tasks", "mnist", "--out", "x", "--schedule", "wavy"], "unknown schedule 'wavy'"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("isomod: error: ") and message in err and err.count("\n") == 1


def test_bad_npz_through_the_cli(tmp_path, capsys):
    data = write_npz(tmp_path / "bad.npz", y_train=None)
    assert main(["train", "--tasks", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "bad.npz: missing array(s) y_train" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("command", [["bench", "mtl", "--seeds", "0"], ["demo"]])
def test_bench_mtl_and_demo_end_to_end_write_the_contract(tmp_path, command):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "isomod.cli", *command, "--out", str(out), "--steps", "6",
           "--checkpoint-every", "0", "--discretize-at", "0.5", *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["bench"] == "mtl"
    methods = {r["method"] for r in results["rows"]}
    assert methods == {"modular", "independent", "shared_trunk"}
    for r in results["rows"]:
        assert r["metric"] == "test_acc" and 0 <= r["value"] <= 1
        assert {"task", "params_total", "params_task", "seed"} <= set(r)
    tasks = {r["task"] for r in results["rows"]} - {"mean"}
    assert len(tasks) == 8
    by = {(r["method"], r["task"]): r for r in results["rows"]}
    assert by[("independent", "mean")]["params_total"] > by[("modular", "mean")]["params_total"]
    report = (out / "report.md").read_text()
    assert "| **mean** |" in report
    for png in ("accuracy.png", "curves.png", "usage.png", "similarity.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    assert (out / "runs" / "modular-s0" / "checkpoint" / "model.safetensors").exists()
    assert "| **mean** |" in done.stdout
    if command == ["demo"]:
        assert "learned routes (module per step):" in done.stdout and "glyphs/hebrew: " in done.stdout


def test_help_documents_every_option_with_the_command_s_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model-num-modules INT pool size `N`. (default 16)" in text
    assert "--steps INT optimiser steps. (default 2000)" in text
    with pytest.raises(SystemExit):
        main(["transfer", "--help"])
    assert "optimiser steps. (default 600)" in " ".join(capsys.readouterr().out.split())
