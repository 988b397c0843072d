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
    assert "invalid choice: 'nope' (choose from 'mtl', 'transfer', 'continual', 'adapt', 'reuse', 'speed')" in capsys.readouterr().err
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("grow:\n  threshold: 0.5\n")
    assert main(["train", "--tasks", "mnist", "--out", str(tmp_path / "r"), "--config", str(cfg)]) == 2
    assert "cfg.yaml: unknown keys ['grow']; known: ['model', 'train']" in capsys.readouterr().err


def test_bad_npz_through_the_cli(tmp_path, capsys):
    data = write_npz(tmp_path / "bad.npz", y_train=None)
    assert main(["train", "--tasks", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "bad.npz: missing array(s) y_train" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("command", [["bench", "mtl", "--seeds", "0", "--methods", "modular", "modular_templates",
                                      "independent", "shared_trunk", "--jobs", "2"], ["demo"]])
def test_bench_mtl_and_demo_end_to_end_write_the_contract(tmp_path, command):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "isomod.cli", *command, "--out", str(out), "--steps", "6",
           "--checkpoint-every", "0", "--discretize-at", "0.5", *TINY_BENCH]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["bench"] == "mtl"
    acc_rows = [r for r in results["rows"] if r["metric"] == "test_acc"]
    modular = ["modular", "modular_templates"] if "modular_templates" in command else ["modular"]
    assert {r["method"] for r in acc_rows} == {*modular, "independent", "shared_trunk"}
    for r in acc_rows:
        assert 0 <= r["value"] <= 1 and {"task", "params_total", "params_task", "seed"} <= set(r)
    for m in modular:  # the route diagnostics, per modular method and seed
        diag = {r["metric"]: r["value"] for r in results["rows"] if r["method"] == m and r["task"] == "mean"}
        assert {"route_distance", "cross_route_own", "cross_route_other", "shuffled_acc"} <= set(diag)
        assert 0 <= diag["route_distance"] <= 1 and 0 <= diag["cross_route_other"] <= 1
    if "modular_templates" in command:
        templates = results["routes"]["modular_templates-s0"]
        assert len(templates["final"]["glyphs/digits"][0]) == 2  # K = round(L / 2) templates for L = 3 steps
        assert max(max(w) for w in templates["final"]["glyphs/digits"]) < 1  # soft to the end
        assert len(templates["cross_route"]["acc"]) == 8
    tasks = {r["task"] for r in acc_rows} - {"mean"}
    assert len(tasks) == 8
    by = {(r["method"], r["task"]): r for r in acc_rows}
    assert by[("independent", "mean")]["params_total"] > by[("modular", "mean")]["params_total"]
    report = (out / "report.md").read_text()
    assert "| **mean** |" in report
    for png in ("accuracy.png", "curves.png", "usage.png", "similarity.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    assert (out / "runs" / "modular-s0" / "checkpoint" / "model.safetensors").exists()
    assert results["environment"]["threads"] >= 1 and results["environment"]["device"] == "cpu"
    assert results["environment"].get("jobs", 1) == (2 if "--jobs" in command else 1)
    assert results["config"]["seeds"] == [0] and results["config"]["train"]["steps"] == 6
    assert "| **mean** |" in done.stdout
    if command == ["demo"]:
        assert "learned routes (module per step):" in done.stdout and "glyphs/hebrew: " in done.stdout


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


@pytest.mark.slow
def test_bench_transfer_end_to_end_writes_the_contract_and_resumes(tmp_path, capsys):
    pre = [str(write_npz(tmp_path / f"pre{i}.npz", shape=(16, 16), seed=i)) for i in range(2)]
    new = [str(write_npz(tmp_path / f"new{i}.npz", shape=(16, 16), seed=10 + i, classes=4)) for i in range(2)]
    out = tmp_path / "bench"
    argv = ["bench", "transfer", "--out", str(out), "--pretrain-tasks", *pre, "--held-out", *new,
            "--shots", "2", "all", "--steps", "3", "--pretrain-steps", "4", "--pretrain-batch-size", "8",
            "--pretrain-warmup-steps", "1", "--warmup-steps", "1", "--batch-size", "8", *TINY_BENCH[:4], "--no-progress",
            "--jobs", "2", "--seeds", "0"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["bench"] == "transfer"
    rows = results["rows"]
    from isomod.transfer import TRANSFER

    assert {(r["method"], r["task"], r["shots"]) for r in rows} == {
        (m, t, k) for m in TRANSFER.names() for t in ("new0", "new1") for k in (2, "all")}
    for r in rows:
        assert r["metric"] == "test_acc" and 0 <= r["value"] <= 1 and r["seed"] == 0
        assert r["params_total"] == results["pretrain"]["annealed"]["s0"]["params"] + r["params_task"]
        assert r["regime"] == "annealed"
        assert ("route_steps_changed" in r) == ("route_change" in r) == TRANSFER[r["method"]].learns_route
        assert ("candidates" in r) == (r["method"] == "route_search")
    by = {(r["method"], r["task"], r["shots"]): r["params_task"] for r in rows}
    assert by[("head_only", "new0", 2)] < by[("route_head", "new0", 2)] < by[("route_only", "new0", 2)]
    assert by[("head_only", "new0", 2)] < by[("norm_head", "new0", 2)] < by[("route_only", "new0", 2)] \
        < by[("finetune", "new0", 2)]
    report = (out / "report.md").read_text()
    assert "| new0 | all |" in report and "| **mean** | 2 |" in report
    assert "- route_head: a different module at some step in " in report and "weight moved" in report
    for png in ("accuracy_vs_params.png", "routes-annealed.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    capsys.readouterr()
    seconds = results["train_seconds"]
    assert main(argv) == 0  # the same command again: every row is there, nothing retrains
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == rows and again["train_seconds"] == seconds
    assert main(["report", str(out)]) == 0
    # Another transfer budget over the same pre-trained pools: nothing is pre-trained again.
    other = tmp_path / "other"
    argv = [a if a != str(out) else str(other) for a in argv]
    assert main([*argv, "--pretrain-dir", str(out), "--methods", "head_only", "--lr", "0.01"]) == 0
    shared = json.loads((other / "results.json").read_text())
    assert not (other / "pretrain-annealed-s0").exists() and shared["pretrain"] == results["pretrain"]
    # A resumed run may add methods, shots or seeds: only the new rows are computed.
    assert main([*argv, "--pretrain-dir", str(out), "--methods", "head_only", "route_head", "--lr", "0.01"]) == 0
    grown = json.loads((other / "results.json").read_text())
    assert grown["rows"][: len(shared["rows"])] == shared["rows"]
    assert {r["method"] for r in grown["rows"]} == {"head_only", "route_head"}
    assert grown["config"]["methods"] == ["head_only", "route_head"] and len(grown["rows"]) == 2 * len(shared["rows"])


@pytest.mark.slow
def test_bench_continual_end_to_end(tmp_path, capsys):
    stream = [str(write_npz(tmp_path / f"t{i}.npz", shape=(16, 16), seed=i, n_train=60)) for i in range(3)]
    out = tmp_path / "bench"
    argv = ["bench", "continual", "--out", str(out), "--stream", *stream, "--steps", "4", "--warmup-steps", "1",
            "--grow-threshold", "1.0", "--grow-val-fraction", "0.2", "--seeds", "0", "1", "--regime", "templates",
            "--jobs", "2", *TINY]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["bench"] == "continual"
    rows = results["rows"]
    assert {r["method"] for r in rows} == {"modular_grow", "independent", "finetune_seq"}
    for method in ("modular_grow", "independent", "finetune_seq"):
        for seed in (0, 1):
            sel = [r for r in rows if r["method"] == method and r["seed"] == seed]
            assert [r["after_index"] for r in sel] == [1, 2, 2, 3, 3, 3]
            assert [r["task"] for r in sel if r["after_index"] == 3] == ["t0", "t1", "t2"]
    for grow in results["methods"]["modular_grow"].values():
        assert all(grow["exact_outputs"].values()) and len(grow["outcomes"]) == 3
    params = {m: max(r["params_total"] for r in rows if r["method"] == m) for m in ("modular_grow", "independent")}
    assert params["modular_grow"] < params["independent"]
    report = (out / "report.md").read_text()
    assert "| **mean** |" in report and "bit-identical" in report and "| mean, each seed |" in report
    for png in ("continual.png", "forgetting.png"):
        assert (out / png).stat().st_size > 1000
    model = load_checkpoint(out / "modular_grow-s1" / "checkpoint")
    assert model.task_names == ["t0", "t1", "t2"] and not model.route("t0").is_discrete
    # The same command again trains nothing; with one pass taken out, it trains only that pass.
    seconds = {m: {s: info["seconds"] for s, info in by.items()} for m, by in results["methods"].items()}
    written = (out / "modular_grow-s1" / "checkpoint" / "config.json").stat().st_mtime_ns
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == rows and again["methods"] == results["methods"]
    assert (out / "modular_grow-s1" / "checkpoint" / "config.json").stat().st_mtime_ns == written
    del again["methods"]["independent"]["s1"]
    again["rows"] = [r for r in rows if not (r["method"] == "independent" and r["seed"] == 1)]
    (out / "results.json").write_text(json.dumps(again))
    assert main(argv) == 0
    third = json.loads((out / "results.json").read_text())
    assert len(third["rows"]) == len(rows) and set(third["methods"]["independent"]) == {"s0", "s1"}
    redone = {m: {s: info["seconds"] for s, info in by.items()} for m, by in third["methods"].items()}
    assert {k: v for k, v in redone.items() if k != "independent"} == {
        k: v for k, v in seconds.items() if k != "independent"}
    assert redone["independent"]["s0"] == seconds["independent"]["s0"]


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
