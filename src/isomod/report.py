"""Figures and markdown from a benchmark's `results.json`: module-usage maps, task
similarity from routes, training curves and the results table.

Only this module (and the benchmarks through it) imports matplotlib.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def route_similarity(usage: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Similarity of tasks `a, b`: the mean over steps of `sum_n w_a[l, n] w_b[l, n]`,
    the probability that both run the same module at a step (1 for identical discrete
    routes, 0 for routes that never share a module at the same step)."""
    names = list(usage)
    w = np.stack([np.asarray(usage[n], dtype=np.float64) for n in names])  # (T, L, N)
    sim = np.einsum("aln,bln->ab", w, w) / w.shape[1]
    return names, sim


def plot_usage(usage: dict[str, np.ndarray], path: Path, chosen: dict[str, list[int]] | None = None,
               title: str = "module usage per task (route weights; dots: discrete choice)", cols: int = 4) -> Path:
    """One steps x modules heat map per task, `cols` to a row."""
    plt = _plt()
    names = list(usage)
    cols = min(cols, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        w = np.asarray(usage[name])  # (L, N)
        ax.imshow(w, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        if chosen and chosen.get(name):
            ax.scatter(chosen[name], range(len(chosen[name])), s=12, c="crimson")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("module", fontsize=8)
        ax.set_ylabel("step", fontsize=8)
        ax.set_xticks(range(w.shape[1]))
        ax.set_yticks(range(w.shape[0]))
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_similarity(usage: dict[str, np.ndarray], path: Path, title: str = "task similarity from routes") -> Path:
    plt = _plt()
    names, sim = route_similarity(usage)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.6 + 0.6 * len(names)))
    im = ax.imshow(sim, cmap="viridis", vmin=0, vmax=1)
    short = [n.rsplit("/", 1)[-1] for n in names]
    ax.set_xticks(range(len(names)), short, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), short, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if sim[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_samples(images: dict[str, np.ndarray], path: Path, title: str = "samples per domain") -> Path:
    """One row of uint8 images `(n, C, H, W)` per name."""
    plt = _plt()
    cols = max(len(x) for x in images.values())
    fig, axes = plt.subplots(len(images), cols, figsize=(0.8 * cols + 1.0, 0.85 * len(images)), squeeze=False)
    for row, (name, x) in zip(axes, images.items()):
        for ax in row:
            ax.axis("off")
        for ax, img in zip(row, x):
            img = np.asarray(img).transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        row[0].text(-0.1, 0.5, name, transform=row[0].transAxes, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, tight=False)


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(logs: dict[str, list[dict]], path: Path) -> Path:
    """Training loss and mean running train accuracy against step, one line per run."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, records in logs.items():
        rec = [r for r in records if "loss" in r]
        if not rec:
            continue
        steps = [r["step"] for r in rec]
        ax1.plot(steps, [r["loss"] for r in rec], label=label)
        ax2.plot(steps, [np.mean(list(r["train_acc"].values())) for r in rec], label=label)
        for r in records:
            if r.get("event") == "discretize":
                ax1.axvline(r["step"], color="gray", ls=":", lw=1)
    ax1.set(xlabel="step", ylabel="training loss (EMA)", yscale="log")
    ax2.set(xlabel="step", ylabel="train accuracy (running, mean over tasks)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    return _save(fig, path)


def plot_task_accuracy(rows: list[dict], path: Path, metric: str = "test_acc") -> Path:
    """Grouped bars: per-task metric, one bar per method (mean over seeds)."""
    plt = _plt()
    table = mean_table(rows, metric)
    methods = list(table)
    tasks = [t for t in next(iter(table.values())) if t != "mean"] + ["mean"]
    x = np.arange(len(tasks))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(tasks), 3.6))
    for i, m in enumerate(methods):
        ax.bar(x + i * width, [table[m].get(t, np.nan) for t in tasks], width, label=m)
    ax.set_xticks(x + 0.4 - width / 2, [t.rsplit("/", 1)[-1] for t in tasks], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, len(methods)), frameon=False)
    return _save(fig, path)


def _means_by(rows: list[dict], metric: str, key: str) -> dict[str, dict]:
    """method -> row[key] -> mean of the per-task values (rows of task `mean` are ignored)."""
    acc: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] == metric and r["task"] != "mean":
            acc[r["method"]][r[key]].append(r["value"])
    return {m: {k: float(np.mean(v)) for k, v in per.items()} for m, per in acc.items()}


def mean_table(rows: list[dict], metric: str = "test_acc") -> dict[str, dict[str, float]]:
    """method -> task -> metric averaged over seeds; `mean` recomputed from per-task values."""
    table = _means_by(rows, metric, "task")
    for per in table.values():
        per["mean"] = float(np.mean(list(per.values())))
    return table


def seed_means(rows: list[dict], metric: str = "test_acc") -> dict[str, dict[int, float]]:
    """method -> seed -> mean over that seed's per-task values."""
    return {m: dict(sorted(per.items())) for m, per in _means_by(rows, metric, "seed").items()}


def params_table(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """method -> (total parameters, mean parameters owned per task)."""
    out: dict[str, tuple[int, list[int]]] = {}
    for r in rows:
        if r["task"] == "mean":
            continue
        total, per = out.setdefault(r["method"], (r["params_total"], []))
        per.append(r["params_task"])
    return {m: (t, int(np.mean(p))) for m, (t, p) in out.items()}


def markdown_results(rows: list[dict], metric: str = "test_acc") -> str:
    """Tasks as rows, methods as columns, then the mean and the parameter counts."""
    table = mean_table(rows, metric)
    params = params_table(rows)
    methods = list(table)
    tasks = [t for t in table[methods[0]] if t != "mean"]
    lines = ["| task | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{100 * table[m].get(t, float('nan')):.1f}" for m in methods) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{100 * table[m]['mean']:.1f}**" for m in methods) + " |")
    by_seed = seed_means(rows, metric)
    if any(len(v) > 1 for v in by_seed.values()):
        lines.append("| mean, each seed | " + " | ".join(
            " / ".join(f"{100 * v:.1f}" for v in by_seed[m].values()) for m in methods) + " |")
    lines.append("| params total | " + " | ".join(f"{params[m][0]:,}" for m in methods) + " |")
    lines.append("| params per task | " + " | ".join(f"{params[m][1]:,}" for m in methods) + " |")
    return "\n".join(lines)


def markdown_times(times: dict[str, float]) -> list[str]:
    """A report section with each run's training time (none when there are no times)."""
    if not times:
        return []
    return ["## Training time (s)", "", "| run | seconds |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in times.items()] + [""]


TRANSFER_STYLE = {"route_only": ("o", "tab:red"), "head_only": ("s", "tab:blue"), "norm_head": ("D", "tab:green"),
                  "finetune": ("^", "tab:purple"), "scratch": ("v", "tab:gray")}


def plot_transfer(rows: list[dict], path: Path) -> Path:
    """Test accuracy against the parameters a task added (log scale), one panel per shot
    count, one marker per method, averaged over held-out tasks and seeds."""
    plt = _plt()
    shots = list(dict.fromkeys(r["shots"] for r in rows))
    fig, axes = plt.subplots(1, len(shots), figsize=(4.2 * len(shots), 3.6), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], shots):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["shots"] == k and r["method"] == method]
            if not sel:
                continue
            marker, color = TRANSFER_STYLE.get(method, ("x", None))
            ax.scatter([r["params_task"] for r in sel], [100 * r["value"] for r in sel], marker=marker, color=color,
                       alpha=0.35, s=18)
            ax.scatter([np.mean([r["params_task"] for r in sel])], [100 * np.mean([r["value"] for r in sel])],
                       marker=marker, color=color, s=90, edgecolor="black", label=method)
        ax.set_xscale("log")
        ax.set_title(f"{k} images per class" if k != "all" else "all training images", fontsize=10)
        ax.set_xlabel("parameters added for the task")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("small markers: one held-out task; large: their mean", fontsize=10)
    return _save(fig, path)


def plot_continual(rows: list[dict], stream: list[str], path: Path) -> Path:
    """Mean test accuracy over the tasks seen so far, and total parameters, after each
    task of a stream; one line per method."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = range(1, len(stream) + 1)
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        acc = [100 * np.mean([r["value"] for r in sel if r["after_index"] == i]) for i in steps]
        params = [next(r["params_total"] for r in sel if r["after_index"] == i) for i in steps]
        ax1.plot(steps, acc, marker="o", label=method)
        ax2.plot(steps, params, marker="o", label=method)
    ax1.set_ylabel("mean test accuracy, tasks so far (%)")
    ax2.set_ylabel("parameters")
    for ax in (ax1, ax2):
        ax.set_xlabel("tasks learned")
        ax.set_xticks(list(steps))
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return _save(fig, path)


def plot_forgetting(rows: list[dict], stream: list[str], path: Path) -> Path:
    """Per method, a tasks x stream-position map of test accuracy (blank before a task arrives)."""
    plt = _plt()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 + 3.0 * len(methods), 0.8 + 0.35 * len(stream)),
                             squeeze=False)
    short = [t.rsplit("/", 1)[-1] for t in stream]
    for ax, method in zip(axes[0], methods):
        acc = np.full((len(stream), len(stream)), np.nan)
        for r in rows:
            if r["method"] == method:
                acc[stream.index(r["task"]), r["after_index"] - 1] = 100 * r["value"]
        im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=100)
        for i in range(len(stream)):
            for j in range(len(stream)):
                if not np.isnan(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if acc[i, j] < 50 else "black")
        ax.set_title(method, fontsize=10)
        ax.set_xticks(range(len(stream)), range(1, len(stream) + 1), fontsize=7)
        ax.set_yticks(range(len(stream)), short if ax is axes[0][0] else [""] * len(stream), fontsize=7)
        ax.set_xlabel("after task", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02)
    return _save(fig, path, tight=False)


REUSE_STYLE = {"once": "black", "cyclic": "tab:red", "block_repeat": "tab:orange", "learned": "tab:green",
               "distinct": "tab:blue"}


def plot_reuse(summary: list[dict], path: Path, title: str = "block reuse") -> Path:
    """Test accuracy against parameters and against multiply-adds per image. `once` is one
    line over the pool sizes; every other method has a line per pool size N (solid for the
    first N, dashed for the next) that starts at `once` with that N. Error bars: half the
    seed spread."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), sharey=True)
    sizes = sorted({s["N"] for s in summary})
    styles = ["-", "--", ":", "-."]
    for ax, key, label in zip(axes, ("params", "macs"), ("parameters", "multiply-adds per image")):
        for method, color in REUSE_STYLE.items():
            lines = [[s for s in summary if s["method"] == "once"]] if method == "once" else [
                [s for s in summary if s["method"] == "once" and s["N"] == n]
                + [s for s in summary if s["method"] == method and s["N"] == n] for n in sizes]
            for i, pts in enumerate(lines):
                pts = sorted(pts, key=lambda s: (s["N"], s["L"]))
                if len(pts) < (1 if method == "once" else 2):
                    continue
                ax.errorbar([p[key] for p in pts], [100 * p["mean"] for p in pts], yerr=[50 * p["spread"] for p in pts],
                            color=color, ls="-" if method == "once" else styles[i % len(styles)],
                            marker="s" if method == "once" else "o", ms=5 if method == "once" else 4, capsize=2,
                            lw=2 if method == "once" else 1.2, zorder=3 if method == "once" else 2,
                            label=method if method == "once" else f"{method}, N={sizes[i]}")
                for p in pts:
                    if method != "once" or ax is axes[0]:
                        ax.annotate(f"N={p['N']}" if method == "once" else f"L={p['L']}", (p[key], 100 * p["mean"]),
                                    fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"{title} (error bars: half the seed spread)", fontsize=10)
    return _save(fig, path)


def plot_speed(rows: list[dict], path: Path) -> Path:
    """Training step time and peak memory as multiples of the plain network's (the black
    line at 1), against the pool size N; one line per method, solid for 1 task per step,
    dashed for more."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"weight_mixing": "tab:red", "output_mixing": "tab:blue", "discrete": "tab:green"}
    for ax, metric, label in zip(axes, ("train_time_ratio_to_plain", "peak_mem_ratio_to_plain"),
                                 ("training step time / plain", "peak training memory / plain")):
        for method, color in colors.items():
            for t in sorted({r["tasks"] for r in rows if r["metric"] == metric}):
                sel = sorted((r for r in rows if r["method"] == method and r["metric"] == metric and r["tasks"] == t),
                             key=lambda r: r["N"])
                if sel:
                    ax.plot([r["N"] for r in sel], [r["value"] for r in sel], color=color, marker="o",
                            ls="-" if t == 1 else "--", label=f"{method}, {t} task{'s' if t > 1 else ''}/step")
        ax.axhline(1.0, color="black", lw=1, label="plain")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("pool size N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    return _save(fig, path)
