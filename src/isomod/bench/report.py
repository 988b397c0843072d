"""What several benchmarks draw and print from their `results.json`: module-usage maps,
accuracy per task, the results table; and the matplotlib helpers their own figures use.

matplotlib is imported only when a figure is drawn (`pyplot()`), never by `import isomod`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from isomod.bench.docs import md_table


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
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
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_task_accuracy(rows: list[dict], path: Path, metric: str = "test_acc") -> Path:
    """Grouped bars: per-task metric, one bar per method (mean over seeds)."""
    plt = pyplot()
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
    return save_figure(fig, path)


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


def params_table(rows: list[dict], metric: str = "test_acc") -> dict[str, tuple[int, int]]:
    """method -> (total parameters, mean parameters owned per task), from the `metric` rows."""
    out: dict[str, tuple[int, list[int]]] = {}
    for r in rows:
        if r["task"] == "mean" or r["metric"] != metric:
            continue
        total, per = out.setdefault(r["method"], (r["params_total"], []))
        per.append(r["params_task"])
    return {m: (t, int(np.mean(p))) for m, (t, p) in out.items()}


def markdown_results(rows: list[dict], metric: str = "test_acc") -> str:
    """Tasks as rows, methods as columns, then the mean and the parameter counts."""
    table = mean_table(rows, metric)
    params = params_table(rows, metric)
    methods = list(table)
    tasks = [t for t in table[methods[0]] if t != "mean"]
    body = [[t, *(f"{100 * table[m].get(t, float('nan')):.1f}" for m in methods)] for t in tasks]
    body.append(["**mean**", *(f"**{100 * table[m]['mean']:.1f}**" for m in methods)])
    by_seed = seed_means(rows, metric)
    if any(len(v) > 1 for v in by_seed.values()):
        body.append(["mean, each seed", *(" / ".join(f"{100 * v:.1f}" for v in by_seed[m].values()) for m in methods)])
    body.append(["params total", *(f"{params[m][0]:,}" for m in methods)])
    body.append(["params per task", *(f"{params[m][1]:,}" for m in methods)])
    return "\n".join(md_table(["task", *methods], body, "l" + "r" * len(methods)))


def markdown_times(times: dict[str, float]) -> list[str]:
    """A report section with each run's training time (none when there are no times)."""
    if not times:
        return []
    return ["## Training time (s)", "", *md_table(["run", "seconds"], times.items(), "lr"), ""]


