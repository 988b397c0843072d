"""`isomod bench serve`: one batch that mixes tasks, against the same batch from one task.

A pool of `num_modules` modules serves `max(tasks)` tasks, each with its own discrete route
(drawn at random: serving cost does not depend on what was learned) and its own norms and
head. For every thread count and every number `T` of tasks in a batch of `batch_size`
images (spread `uniform`ly, or `skewed`: one task holds half the images, the other `T - 1`
share the rest), in one process and alternating so that every figure sees the same machine:

- `mixed`: `net(x, tasks)`, one task name per image (`isomod.core.mixed`);
- `single_task`: the same batch, every image under one task;
- `exported`: each task's exported static network (`isomod.io.export`) run on its share;
- `plain`: a plain isometric ResNet of the same width and depth.

Rows give images per second (`img_per_s`, the median over `repeats` rounds after `warmup`)
and, per round, the throughput of the mixed batch over the single-task batch
(`mixed_to_single`, one row a round: the claim's units).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from isomod.bench.base import Bench, Context, Job, register
from isomod.bench.docs import md_table
from isomod.bench.results import Row
from isomod.core.baselines import PlainResNet
from isomod.core.network import ModelConfig, ModularNet, TaskSpec
from isomod.errors import IsomodError
from isomod.files import write_text_atomic
from isomod.io.export import export_task
from isomod import seeds

DISTRIBUTIONS = ("uniform", "skewed")
METHODS = ("mixed", "single_task", "exported", "plain")


@dataclass
class ServeConfig:
    """What `bench serve` measures.

    Args:
        tasks: numbers of tasks mixed in one batch.
        distributions: `uniform` (every task an equal share) and/or `skewed` (one task half).
        threads: CPU thread counts, each measured in turn.
        batch_size: images per batch.
        image_size: side of the random square grey images.
        num_classes: classes of every task.
        warmup: rounds run before timing.
        repeats: timed rounds.
        seed: the routes and weights drawn.
        model: the pool's shape.
    """

    tasks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    distributions: list[str] = field(default_factory=lambda: list(DISTRIBUTIONS))
    threads: list[int] = field(default_factory=lambda: [1, 2])
    batch_size: int = 256
    image_size: int = 28
    num_classes: int = 10
    warmup: int = 2
    repeats: int = 9
    seed: int = 0
    model: ModelConfig = field(default_factory=lambda: ModelConfig(channels=32, num_modules=16, steps=8,
                                                                   stem_stride=2))

    def __post_init__(self):
        if not self.tasks or min(self.tasks) < 1:
            raise IsomodError(f"tasks: give positive numbers of tasks per batch, got {self.tasks}")
        if max(self.tasks) > self.batch_size:
            raise IsomodError(f"tasks: at most one task per image ({self.batch_size}), got {max(self.tasks)}")
        bad = [d for d in self.distributions if d not in DISTRIBUTIONS]
        if bad or not self.distributions:
            raise IsomodError(f"distributions: choose from {', '.join(DISTRIBUTIONS)}, got {self.distributions}")
        if not self.threads or min(self.threads) < 1:
            raise IsomodError(f"threads: give positive thread counts, got {self.threads}")
        if self.repeats < 1 or self.warmup < 0:
            raise IsomodError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")


def build(cfg: ServeConfig) -> tuple[ModularNet, PlainResNet]:
    """A pool serving `max(tasks)` tasks on random discrete routes, and the plain network."""
    seeds.seed(cfg.seed)
    shape = (1, cfg.image_size, cfg.image_size)
    n = max(cfg.tasks)
    net = ModularNet(cfg.model, [TaskSpec(f"t{i}", cfg.num_classes, shape) for i in range(n)]).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    for i in range(n):
        net.route(f"t{i}").set_choice(torch.randint(len(net.pool), (cfg.model.steps,), generator=g).tolist())
    plain = PlainResNet(cfg.model, [TaskSpec("t0", cfg.num_classes, shape)]).eval()
    return net, plain


def assignment(t: int, batch: int, distribution: str) -> list[str]:
    """The task of each image: `t` tasks, equal shares or one task half the batch."""
    if distribution == "uniform" or t == 1:
        return [f"t{i % t}" for i in range(batch)]
    half = batch // 2
    return ["t0"] * half + [f"t{1 + i % (t - 1)}" for i in range(batch - half)]


def rounds(calls: list, warmup: int, repeats: int) -> list[list[float]]:
    """Seconds of each call in each round, the calls alternating within a round."""
    for _ in range(warmup):
        for call in calls:
            call()
    times = []
    for _ in range(repeats):
        row = []
        for call in calls:
            t0 = time.perf_counter()
            call()
            row.append(time.perf_counter() - t0)
        times.append(row)
    return times


@torch.no_grad()
def measure(cfg: ServeConfig, progress: bool) -> list[Row]:
    net, plain = build(cfg)
    x = torch.rand(cfg.batch_size, 1, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    exported = {name: export_task(net, name) for name in net.task_names}
    saved, rows = torch.get_num_threads(), []
    try:
        for threads in cfg.threads:
            torch.set_num_threads(threads)
            for distribution in cfg.distributions:
                for t in cfg.tasks:
                    if t == 1 and distribution != cfg.distributions[0]:
                        continue  # one task: the distributions coincide
                    rows += measure_one(cfg, net, plain, exported, x, t, distribution, threads, progress)
    finally:
        torch.set_num_threads(saved)
    return rows


def measure_one(cfg: ServeConfig, net, plain, exported: dict, x: torch.Tensor, t: int, distribution: str,
                threads: int, progress: bool) -> list[Row]:
    tasks = assignment(t, len(x), distribution)
    shares = {name: torch.tensor([i for i, n in enumerate(tasks) if n == name]) for name in dict.fromkeys(tasks)}
    calls = [lambda: net(x, tasks), lambda: net(x, "t0"),
             lambda: [exported[name](x[rows]) for name, rows in shares.items()], lambda: plain(x, "t0")]
    times = rounds(calls, cfg.warmup, cfg.repeats)
    common = {"tasks": t, "distribution": distribution, "threads": threads, "batch_size": len(x)}
    out = [Row(m, "all", "img_per_s", round(len(x) / statistics.median(r[i] for r in times), 1), dict(common))
           for i, m in enumerate(METHODS)]
    out += [Row("mixed", "all", "mixed_to_single", round(r[1] / r[0], 4), {**common, "round": k})
            for k, r in enumerate(times)]
    if progress:
        m = {row.method: row.value for row in out if row.metric == "img_per_s"}
        print(f"threads {threads}, {t} task(s), {distribution}: mixed {m['mixed']:.0f} img/s, one task "
              f"{m['single_task']:.0f}, exported per task {m['exported']:.0f}, plain {m['plain']:.0f}", flush=True)
    return out


def plan(ctx: Context):
    """One job, in this process: the figures compare within it."""
    yield [Job(measure, (ctx.config, ctx.progress), lambda results, rows: results.add(*rows))]


def describe(config: ServeConfig, inputs: dict) -> dict:
    return {**asdict(config), "device": "cpu"}


def ratio(rows: list[dict], threads: int, t: int, distribution: str) -> float | None:
    found = [r["value"] for r in rows if r["metric"] == "mixed_to_single" and r["threads"] == threads
             and r["tasks"] == t and r["distribution"] == distribution]
    return statistics.median(found) if found else None


def summary(results: dict) -> str:
    rows = results["rows"]
    lines = ["Images per second (median over rounds) of a batch of "
             f"{results['config']['batch_size']} images, and the throughput of the mixed batch over the same batch "
             "from one task (median of the per-round ratios).", ""]
    for threads in results["config"]["threads"]:
        body = []
        for r in rows:
            if r["metric"] != "img_per_s" or r["method"] != "mixed" or r["threads"] != threads:
                continue
            cells = [next(s["value"] for s in rows if s["metric"] == "img_per_s" and s["method"] == m
                          and s["threads"] == threads and s["tasks"] == r["tasks"]
                          and s["distribution"] == r["distribution"]) for m in METHODS]
            body.append([r["tasks"], r["distribution"], *(f"{c:,.0f}" for c in cells),
                         f"{ratio(rows, threads, r['tasks'], r['distribution']):.2f}"])
        lines += [f"{threads} thread{'s' if threads > 1 else ''}:", "",
                  *md_table(["tasks", "distribution", "mixed", "one task", "exported, per task", "plain",
                             "mixed / one task"], body, "rlrrrrr"), ""]
    return "\n".join(lines).rstrip()


def write_report(out: Path, results: dict) -> Path:
    text = "\n".join(["# isomod bench serve", "", summary(results), ""])
    return write_text_atomic(out / "report.md", text)


BENCH = register(Bench("serve", "inference of a batch mixing tasks against one task's batch, exported networks and "
                       "a plain network", ServeConfig, plan, write_report, summary, unprefixed="",
                       describe=describe, device=lambda c: "cpu", resume=False))
run = BENCH.run
