"""The benches end to end on tiny configs: the results contract, resume, reports."""

import json
import subprocess
import sys

import pytest

from isomod import load_checkpoint
from isomod.cli import main

from conftest import write_npz
from test_cli import TINY, TINY_BENCH


@pytest.mark.slow
@pytest.mark.parametrize("command", [["bench", "mtl", "--suite", "digits", "--seeds", "0", "--methods", "modular",
                                      "modular_templates", "independent", "shared_trunk", "--jobs", "2"], ["demo"]])
def test_bench_mtl_and_demo_end_to_end_write_the_contract(tmp_path, command):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "isomod", *command, "--out", str(out), "--steps", "6",
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
        assert len(templates["final"]["mnist"][0]) == 2  # K = round(L / 2) templates for L = 3 steps
        assert max(max(w) for w in templates["final"]["mnist"]) < 1  # soft to the end
        assert len(templates["cross_route"]["acc"]) == 2
    tasks = {r["task"] for r in acc_rows} - {"mean"}
    assert len(tasks) == (8 if command == ["demo"] else 2)
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


@pytest.mark.slow
def test_bench_transfer_end_to_end_writes_the_contract_and_resumes(tmp_path, capsys):
    pre = [str(write_npz(tmp_path / f"pre{i}.npz", shape=(16, 16), seed=i)) for i in range(2)]
    new = [str(write_npz(tmp_path / "new0.npz", shape=(16, 16), seed=10, classes=4))]
    out = tmp_path / "bench"
    argv = ["bench", "transfer", "--out", str(out), "--pretrain-tasks", *pre, "--held-out", *new,
            "--shots", "2", "all", "--steps", "3", "--pretrain-steps", "4", "--pretrain-batch-size", "8",
            "--pretrain-warmup-steps", "1", "--warmup-steps", "1", "--batch-size", "8", *TINY_BENCH[:4], "--no-progress",
            "--jobs", "2", "--seeds", "0"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["bench"] == "transfer"
    rows = results["rows"]
    from isomod.methods.transfer import TRANSFER

    assert {(r["method"], r["task"], r["shots"]) for r in rows} == {
        (m, "new0", k) for m in (*TRANSFER.names(), "route_search_hindsight") for k in (2, "all")}
    for r in rows:
        if r["method"] in ("route_search", "route_search_hindsight"):  # where the search goes wrong
            assert {"proxy_test_spearman", "found_test_ncm", "hindsight_test_ncm"} <= r.keys()
            assert r["hindsight_test_ncm"] >= r["found_test_ncm"]
    hindsight = [r for r in rows if r["method"] == "route_search_hindsight"]
    assert {r["setting"] for r in hindsight} == {"analysis"}
    rows = [r for r in rows if r["method"] != "route_search_hindsight"]
    for r in rows:
        assert r["metric"] == "test_acc" and 0 <= r["value"] <= 1 and r["seed"] == 0
        assert r["params_total"] == results["pretrain"]["annealed"]["s0"]["params"] + r["params_task"]
        assert r["regime"] == "annealed"
        assert ("route_steps_changed" in r) == ("route_change" in r) == TRANSFER[r["method"]].learns_route
        assert ("candidates" in r) == (r["method"] == "route_search")
        if TRANSFER[r["method"]].learns_route:  # soft and discrete, side by side
            assert r["route_form"] == ("discrete" if r["method"] == "route_search" else "soft")
            assert 0 <= r["acc_discretized"] <= 1 and (r["route_form"] == "discrete") == ("acc_soft" not in r)
            assert r["value"] == r.get("acc_soft", r["acc_discretized"])
    by = {(r["method"], r["task"], r["shots"]): r["params_task"] for r in rows}
    assert by[("head_only", "new0", 2)] < by[("route_head", "new0", 2)] < by[("route_only", "new0", 2)]
    assert by[("head_only", "new0", 2)] < by[("norm_head", "new0", 2)] < by[("route_only", "new0", 2)] \
        < by[("finetune", "new0", 2)]
    report = (out / "report.md").read_text()
    assert "| new0 | all |" in report and "| **mean** | 2 |" in report
    assert "| all | route_search_hindsight | head_only |" in report
    assert "| method | shots | soft route | its argmax | argmax - soft (points) |" in report  # both forms
    assert "| route_head | 2 |" in report and "| route_only | all |" in report
    assert "- route_head: a different module at some step in " in report and "weight moved" in report
    for png in ("accuracy_vs_params.png", "routes-annealed.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    capsys.readouterr()
    seconds = results["train_seconds"]
    assert main(argv) == 0  # the same command again: every row is there, nothing retrains
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == results["rows"] and again["train_seconds"] == seconds
    assert main(["report", str(out)]) == 0
    # Another transfer budget over the same pre-trained pools: nothing is pre-trained again.
    other = tmp_path / "other"  # --jobs 1 from here: the first run used worker processes, which take seconds to start
    argv = [{str(out): str(other), "2": "1"}.get(a, a) if argv[i - 1] in ("--out", "--jobs") else a
            for i, a in enumerate(argv)]
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




def test_bench_serve_times_a_mixed_batch_against_one_task_s(tmp_path, capsys):
    out = tmp_path / "serve"
    assert main(["bench", "serve", "--out", str(out), "--tasks", "1", "3", "--threads", "1", "--repeats", "2",
                 "--warmup", "0", "--batch-size", "12", "--model-channels", "4", "--model-num-modules", "4",
                 "--model-steps", "2", "--image-size", "12", "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    speeds = {(r["method"], r["tasks"], r["distribution"]) for r in rows if r["metric"] == "img_per_s"}
    assert speeds == {(m, t, d) for m in ("mixed", "single_task", "exported", "plain")
                      for t, d in ((1, "uniform"), (3, "uniform"), (3, "skewed"))}
    assert all(r["value"] > 0 for r in rows)
    assert len([r for r in rows if r["metric"] == "mixed_to_single"]) == 3 * 2  # one a round
    assert "| 3 | skewed |" in (out / "report.md").read_text()
    from isomod.bench.serve import assignment

    skew = assignment(4, 12, "skewed")
    assert skew.count("t0") == 6 and set(skew) == {"t0", "t1", "t2", "t3"}


SLEEPER = '''
import os, signal, sys, time
from pathlib import Path


def sleep_here(folder):
    """Write this worker's pid, then wait; on SIGTERM note it and stop."""
    def stop(signum, frame):
        (Path(folder) / f"stopped-{os.getpid()}").write_text("")
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    (Path(folder) / f"worker-{os.getpid()}").write_text("")
    time.sleep(120)
'''

RUNNER = '''
import sys
sys.path.insert(0, sys.argv[1])
from isomod.bench.workers import Workers
from isomod.errors import Interrupted
from sleeper import sleep_here

if __name__ == "__main__":  # worker processes import this file too
    try:
        with Workers(2) as workers:
            list(workers.map(sleep_here, [(sys.argv[1],), (sys.argv[1],)]))
    except Interrupted as exc:
        print(exc)
        sys.exit(143)
'''


def test_a_terminated_bench_stops_its_worker_processes_too(tmp_path):
    """SIGTERM to a bench running jobs side by side reaches its workers (a training run
    saves its step and stops) before the bench exits: none runs on alone, holding its folder."""
    import os
    import signal
    import time

    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bench = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("worker-*"))) < 2 and time.time() < deadline:
            time.sleep(0.2)
        workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
        assert len(workers) == 2, bench.communicate(timeout=5)
        bench.send_signal(signal.SIGTERM)
        out, err = bench.communicate(timeout=60)
    finally:  # a failed check leaves nothing running
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in out
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("stopped-*")) == sorted(workers)
    for pid in workers:  # gone, not running on
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_discrete_route_over_frozen_statistics_keeps_them():
    """The discrete form of a route learned over frozen norms (`route_head`) runs with the
    statistics the method held, not re-estimated ones, which would change the features its
    head was trained on; a route whose statistics followed it gets them re-estimated."""
    import copy

    import torch

    from isomod import ModelConfig, ModularNet
    from isomod.bench.metrics import route_accuracies
    from isomod.training.batches import evaluate
    from conftest import glyph_task

    task = glyph_task("digits", train=30, test=20)
    torch.manual_seed(0)
    model = ModularNet(ModelConfig(channels=8, num_modules=3, steps=3, route_init="flat"), [task.spec]).eval()
    name = task.spec.name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hard = copy.deepcopy(model)
    hard.discretize(name)
    kept = route_accuracies(model, task, 0.5, None, reestimate=False)
    assert kept == {"route_form": "soft", "acc_soft": 0.5, "acc_discretized": round(evaluate(hard, [task])[name], 5)}
    hard.estimate_stats(task.x_train, name)
    again = route_accuracies(model, task, 0.5, None)
    assert again["acc_discretized"] == round(evaluate(hard, [task])[name], 5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model itself is untouched
