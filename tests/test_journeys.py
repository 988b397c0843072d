"""The journeys a user can trust: a run folder belongs to one run, resume refuses what would
change the run, a lock per folder, signals save the step in progress, a full disk loses
nothing, recorded input shapes are honoured, predictions from files, export metadata."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from isomod import load_checkpoint
from isomod.cli import main

from conftest import image_folder, write_npz

TINY = ["--model-channels", "8", "--model-num-modules", "3", "--model-steps", "3", "--batch-size", "16",
        "--warmup-steps", "2", "--log-every", "2", "--no-progress"]


def train(data, out, *extra):
    return main(["train", "--tasks", str(data), "--out", str(out), "--steps", "6", "--checkpoint-every", "2", *TINY,
                 *extra])


def one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("isomod: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err
    return err


def test_a_run_folder_belongs_to_one_run(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", shape=(16, 16))
    run = tmp_path / "run"
    assert train(data, run) == 0
    before = (run / "checkpoint" / "model.safetensors").read_bytes()
    log = (run / "log.jsonl").read_text()
    capsys.readouterr()
    assert train(data, run) == 2
    one_line_error(capsys, "holds a run already (a checkpoint at step 6)", "--resume", "--force")
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == before and (run / "log.jsonl").read_text() == log
    assert train(data, run, "--force", "--seed", "3") == 0  # starts over: a new log, new weights
    assert (run / "log.jsonl").read_text().count('"step": 2,') == 1
    assert (run / "checkpoint" / "model.safetensors").read_bytes() != before
    capsys.readouterr()
    assert train(data, tmp_path / "fresh", "--resume") == 2
    one_line_error(capsys, "--resume: no checkpoint in", "run without --resume to start")


def test_resume_refuses_changed_options_and_states_an_extension(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", shape=(16, 16))
    run = tmp_path / "run"
    assert train(data, run, "--seed", "3") == 0
    saved = (run / "train_config.json").read_text()
    capsys.readouterr()
    assert train(data, run, "--seed", "3", "--resume", "--lr", "0.01") == 2
    one_line_error(capsys, "these options differ from it: lr 0.002 -> 0.01")
    assert train(data, run, "--seed", "3", "--resume", "--steps", "8") == 2
    one_line_error(capsys, "set up for 6 steps, not 8; add --extend")
    assert (run / "train_config.json").read_text() == saved  # a refused resume changes nothing
    assert main(["train", "--tasks", str(data), "--out", str(run), "--steps", "8", "--checkpoint-every", "2",
                 *TINY[:-1], "--seed", "3", "--resume", "--extend"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "from step 6 of 8; extending the run from 6 to 8 steps" in err
    recorded = json.loads((run / "train_config.json").read_text())
    assert recorded["steps"] == 8 and recorded["tasks"][0]["name"] == "d" and recorded["regime"] == "annealed"
    assert recorded["model"]["channels"] == 8 and recorded["command"][:2] == ["isomod", "train"]


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_first(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", shape=(16, 16))
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from isomod.training.runs import RunLock
        with RunLock({str(run)!r}):
            print("held", flush=True)
            time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train(data, run) == 2
        one_line_error(capsys, f"is in use by process {holder.pid}", "wait for it to end")
    finally:
        holder.kill()
        holder.wait()
    assert train(data, run) == 0  # the lock went with its process


def test_sigterm_saves_the_step_in_progress_and_resumes_bit_exact(tmp_path, capsys, monkeypatch):
    from isomod.training.trainer import Trainer

    data = write_npz(tmp_path / "d.npz", shape=(16, 16))
    assert train(data, tmp_path / "full", "--checkpoint-every", "0") == 0
    step = Trainer.train_step

    def killed_at_3(self, run):
        step(self, run)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "train_step", killed_at_3)
    argv = ["train", "--tasks", str(data), "--out", str(tmp_path / "run"), "--steps", "6", "--checkpoint-every", "0",
            *TINY]
    capsys.readouterr()
    assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 3 of 6: checkpoint of step 3 saved in" in err
    assert "continue with: isomod train --tasks" in err and err.strip().endswith("--resume")
    assert json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["extra"]["step"] == 3
    monkeypatch.setattr(Trainer, "train_step", step)
    assert main([*argv, "--resume"]) == 0
    a, b = (load_checkpoint(tmp_path / r / "checkpoint").state_dict() for r in ("full", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    from isomod.io import checkpoint

    data = write_npz(tmp_path / "d.npz", shape=(16, 16))
    run = tmp_path / "run"
    real, calls = checkpoint.save_file, []

    def filling(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", filling)
    assert train(data, run) == 2
    one_line_error(capsys, "cannot write the checkpoint", "No space left on device", "the last good checkpoint")
    assert json.loads((run / "checkpoint" / "config.json").read_text())["extra"]["step"] == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoint")) == []
    load_checkpoint(run / "checkpoint")


def test_eval_transfer_and_predict_honour_the_recorded_image_size(tmp_path, capsys):
    folder = image_folder(tmp_path / "shapes", classes=("circle", "square", "star"), n=12, size=40)
    run = tmp_path / "run"
    assert main(["train", "--tasks", str(folder), "--out", str(run), "--image-size", "32", "--steps", "4", *TINY]) == 0
    trained = capsys.readouterr().out
    assert "shapes: 3 classes" in trained and "images of 1x32x32" in trained
    final = float(trained.split("test acc ")[1].split()[0])
    assert main(["eval", "--from", str(run)]) == 0  # a run folder finds its checkpoint
    assert f"shapes: test acc {final:.4f}"[:-1] in capsys.readouterr().out
    other = image_folder(tmp_path / "other", classes=("a", "b"), n=12, size=40)
    assert main(["transfer", "--from", str(run), "--task", str(other), "--image-size", "28", "--steps", "2",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    one_line_error(capsys, "holds 1x28x28 images; this model's tasks take 1x32x32")
    assert main(["transfer", "--from", str(run), "--task", str(other), "--steps", "2", "--out", str(tmp_path / "t"),
                 "--batch-size", "8", "--no-progress"]) == 0
    assert "other: 2 classes" in capsys.readouterr().out
    files = sorted((folder / "star").iterdir())[:2]
    assert main(["predict", "--from", str(run), "--task", "shapes", *map(str, files), str(folder / "circle"),
                 "--json", "--top", "2"]) == 0
    out = capsys.readouterr()
    found = json.loads(out.out)
    assert len(found) == 2 + 12 and all(len(p["top"]) == 2 for p in found)
    assert {c["class"] for p in found for c in p["top"]} <= {"circle", "square", "star"}
    assert all(0 <= c["p"] <= 1 for p in found for c in p["top"]) and found[0]["file"] == str(files[0])
    assert "14 of 14 images resized to 32x32, the size shapes was trained at" in out.err
    assert main(["predict", "--from", str(run), "--task", "shapes", str(files[0])]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{files[0]}: ") and line.count(",") == 2


def test_eval_reads_moved_data_from_data_and_skips_route_diagnostics_of_a_baseline(tmp_path, capsys):
    from isomod import PlainResNet, save_checkpoint
    from isomod.core.network import ModelConfig

    data = write_npz(tmp_path / "d.npz", shape=(16, 16))
    run = tmp_path / "run"
    assert train(data, run) == 0
    moved = tmp_path / "moved.npz"
    data.rename(moved)
    capsys.readouterr()
    assert main(["eval", "--from", str(run)]) == 2
    one_line_error(capsys, "was read from", "which is not there now; give its data with --data PATH")
    assert main(["eval", "--from", str(run), "--data", str(moved), "--device", "cpu"]) == 0
    assert "d: test acc" in capsys.readouterr().out
    baseline = PlainResNet(ModelConfig(channels=4, steps=2), [load_checkpoint(run / "checkpoint").specs["d"]])
    save_checkpoint(baseline, tmp_path / "plain")
    assert main(["eval", "--from", str(tmp_path / "plain"), "--data", str(moved), "--diagnostics"]) == 0
    assert "route diagnostics skipped: the tasks of a PlainResNet own no routes" in capsys.readouterr().out


def test_your_own_tasks_can_be_domains_of_one_label_space(tmp_path, capsys):
    a, b, target = (write_npz(tmp_path / f"{n}.npz", shape=(16, 16), n_train=80, seed=i)
                    for i, n in enumerate(("a", "b", "t")))
    run = tmp_path / "run"
    assert main(["train", "--tasks", str(a), str(b), "--label-space", "toys", "--out", str(run), "--steps", "4",
                 *TINY]) == 0
    model = load_checkpoint(run / "checkpoint")
    assert model.head_of("a") is model.head_of("b") is model.heads["toys"]
    assert main(["adapt", "--from", str(run), "--target", str(target), "--label-space", "toys", "--method", "adabn",
                 "--out", str(tmp_path / "z"), "--no-progress"]) == 0
    assert "t: adabn started from" in capsys.readouterr().out
    assert main(["adapt", "--from", str(run), "--target", str(target), "--method", "adabn", "--out",
                 str(tmp_path / "y"), "--no-progress"]) == 2
    one_line_error(capsys, "has no label space")


def test_export_files_carry_their_task_classes_and_input(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", shape=(16, 16))
    run = tmp_path / "run"
    assert train(data, run) == 0
    capsys.readouterr()
    pt, onnx_file = tmp_path / "d.pt", tmp_path / "d.onnx"
    assert main(["export", "--from", str(run), "--task", "d", "--out", str(pt), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "input: float32 (batch, 1, 16, 16), values in [0, 1]" in printed and "logits over 3 classes (0, 1, 2)" in printed
    script = f"import json, torch; e = {{'isomod.json': ''}}; torch.jit.load({str(pt)!r}, _extra_files=e); " \
             "print(e['isomod.json'].decode())"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    meta = json.loads(done.stdout)
    assert meta["task"] == "d" and meta["class_names"] == ["0", "1", "2"] and meta["input_shape"] == [1, 16, 16]
    assert meta["value_range"] == [0.0, 1.0] and meta["channels"] == 1
    pytest.importorskip("onnxruntime")
    import onnxruntime

    assert main(["export", "--from", str(run), "--task", "d", "--format", "onnx", "--out", str(onnx_file)]) == 0
    session = onnxruntime.InferenceSession(str(onnx_file))
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == ["0", "1", "2"] and json.loads(props["input_shape"]) == [1, 16, 16]
    assert session.get_inputs()[0].name == "images" and session.get_outputs()[0].name == "logits"


def test_a_bench_refuses_another_configuration_in_its_folder(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "reuse", "--task", str(write_npz(tmp_path / "d.npz", shape=(16, 16))), "--out", str(out),
            "--modules", "2", "--multiples", "1", "--methods", "once", "--seeds", "0", "--steps", "2",
            "--batch-size", "8", "--model-channels", "4", "--no-progress"]
    assert main(argv) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert main([*argv, "--lr", "0.01"]) == 2
    one_line_error(capsys, "holds a run of other train", "--force")
    assert (out / "results.json").read_text() == before
    assert main([*argv, "--lr", "0.01", "--force"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["train"]["lr"] == 0.01
