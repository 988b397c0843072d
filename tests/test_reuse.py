"""Block reuse: fixed patterns, the run plan, multiply-add counts, and a tiny bench end to end."""

import json

import pytest

from isomod import IsomodError
from isomod.bench import reuse
from isomod.bench.reuse import reuse_pattern
from isomod.cli import main
from isomod.core.network import ModelConfig, ModularNet, TaskSpec
from isomod.bench.metrics import macs_per_image
from isomod.training.trainer import TrainConfig


def test_patterns():
    assert reuse_pattern("cyclic", 4, 8) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert reuse_pattern("block_repeat", 4, 8) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert reuse_pattern("block_repeat", 4, 12) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert reuse_pattern("once", 4, 4) == [0, 1, 2, 3]
    assert reuse_pattern("distinct", 4, 8) == list(range(8))
    assert reuse.pool_size("distinct", 4, 8) == 8 and reuse.pool_size("cyclic", 4, 8) == 4
    with pytest.raises(IsomodError, match="unknown route pattern .twice.; known: once, cyclic"):
        reuse_pattern("twice", 4, 8)


def test_plan():
    runs = reuse.grid([2], [1, 2], list(reuse.REUSE_METHODS))
    assert runs == [("once", 2, 2), ("cyclic", 2, 4), ("block_repeat", 2, 4), ("learned", 2, 4), ("templates", 2, 4),
                    ("distinct", 2, 4)]
    with pytest.raises(IsomodError, match="nothing to run"):
        reuse.grid([2], [1], ["cyclic"])
    with pytest.raises(IsomodError, match="step multiples must be >= 1"):
        reuse.grid([2], [0, 2], ["cyclic"])


def test_macs_count_each_step_run_and_reuse_adds_no_module_parameters():
    c, hw = 8, 14 * 14
    nets = {}
    for name, (n, pattern) in {"once": (2, [0, 1]), "cyclic": (2, [0, 1, 0, 1]), "distinct": (4, [0, 1, 2, 3])}.items():
        net = ModularNet(ModelConfig(channels=c, num_modules=n, steps=len(pattern)), [TaskSpec("t", 5)])
        net.route("t").set_choice(pattern)
        nets[name] = net
        expected = 1 * c * 9 * hw + len(pattern) * 2 * c * c * 9 * hw + c * 5
        assert macs_per_image(net, "t") == expected
    # Two more steps add their norms and route logits (L x N), never module weights.
    norms_per_step, logits_per_step = 2 * 2 * c, 2
    assert nets["cyclic"].param_count() - nets["once"].param_count() == 2 * (norms_per_step + logits_per_step)
    assert nets["distinct"].param_count() - nets["cyclic"].param_count() == 2 * 2 * c * c * 9 + 4 * 2


def test_tiny_bench_writes_rows_report_and_figure(tmp_path, digit_tasks):
    task = digit_tasks[0]
    out = tmp_path / "bench"
    train = TrainConfig(steps=100, batch_size=32, lr=1e-2, lr_heads=1e-2, warmup_steps=5, augment=False,
                        checkpoint_every=0, log_every=10)
    config = reuse.ReuseConfig(modules=[2], multiples=[1, 2], model=ModelConfig(channels=8), train=train, seeds=[0])
    results = reuse.run(out, config, progress=False, data=task)
    saved = json.loads((out / "results.json").read_text())
    assert saved["bench"] == "reuse" and saved["rows"] == results["rows"]
    rows = saved["rows"]
    assert {(r["method"], r["N"], r["L"]) for r in rows} == {(m, 2, 2 if m == "once" else 4) for m in reuse.REUSE_METHODS}
    acc = {r["method"]: r for r in rows if r["metric"] == "test_acc"}
    macs = {r["method"]: r["value"] for r in rows if r["metric"] == "macs"}
    assert macs["cyclic"] == macs["block_repeat"] == macs["learned"] == macs["distinct"] > 1.9 * macs["once"]
    # Templates mix the pool's weights at every step: the mixing adds L x N x (weights) multiply-adds.
    assert macs["templates"] > macs["cyclic"] and acc["templates"]["params_total"] == acc["learned"]["params_total"]
    assert acc["distinct"]["params_total"] > acc["cyclic"]["params_total"]
    # Ten classes: every method learned something in 100 steps.
    assert min(r["value"] for r in acc.values()) > 0.3
    assert saved["routes"]["cyclic-N2-L4-s0"] == [0, 1, 0, 1]
    assert len(saved["routes"]["learned-N2-L4-s0"]) == 4
    templates = json.loads((out / "runs" / "templates-N2-L4-s0" / "checkpoint" / "config.json").read_text())
    assert templates["routes"]["mnist"] is None  # still soft at the end
    text = (out / "report.md").read_text()
    assert "| 2 | 4 | block_repeat |" in text and "N=2, L=4, cyclic:" in text and (out / "reuse.png").stat().st_size > 0
    # A second run reloads the complete checkpoints instead of training again.
    again = reuse.run(out, config, progress=False, data=task)
    assert again["rows"] == results["rows"]
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists()
    # The docs page keeps its hand-written text and gets the tables from results.json.
    page = tmp_path / "reuse.md"
    page.write_text("# Reuse\n\nintro\n\n<!-- isomod report: begin -->\nold table\n<!-- isomod report: end -->\n\nnotes\n")
    for _ in range(2):
        assert main(["report", str(out), "--docs", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Reuse\n\nintro\n\n<!-- isomod report: begin -->") and text.endswith("\n\nnotes\n")
    assert "old table" not in text and text.count("| 2 | 4 | block_repeat |") == 1 and "threads " in text
    assert "|\n\n- N=2, L=4, " in text  # the checks are a list below the table, not rows of it


def test_checks_compare_reuse_with_once_and_distinct():
    rows = []
    for seed, accs in enumerate([{"once": 0.80, "cyclic": 0.84, "distinct": 0.86}, {"once": 0.81, "cyclic": 0.85, "distinct": 0.87}]):
        for method, value in accs.items():
            L = 2 if method == "once" else 4
            rows.append({"method": method, "task": "t", "N": 2, "L": L, "metric": "test_acc", "value": value,
                         "params_total": 1, "params_task": 1, "seed": seed})
    (line,) = reuse.checks({"rows": rows})
    assert "+4.00, seed spread 1.00: beats once" in line and line.endswith("reuse recovers 67%")
    # A loss larger than the spread is called one; no share of a gain inside the noise.
    for r in rows:
        r["value"] += {"cyclic": -0.08, "distinct": -0.055}.get(r["method"], 0.0)
    (line,) = reuse.checks({"rows": rows})
    assert "(-4.00, seed spread 1.00: below once by more than the spread)" in line
    assert line.endswith("distinct gains +0.50, not above its seed spread 1.00: no gain to recover")
