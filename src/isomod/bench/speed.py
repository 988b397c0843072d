"""`isomod bench speed`: what a route costs. Training images per second and peak memory of
ModularNet (weight mixing, output mixing, discrete) against a plain isometric ResNet of the
same width and depth, and inference of an exported route against the plain network, all
measured in one run, on random images of one shape.

`weight_mixing` is a soft route over N modules whose start is the model config's;
`grouped` the same network trained with the step's tasks as one forward pass
(`TrainConfig.group_tasks`: a grouped convolution per block half, `isomod.training.grouped`);
`templates` is a template regime of `isomod.training.regimes` (`template_regime`: K = N templates
over the model's `steps`, soft to the end, norms' affine parameters wherever that regime
puts them), timed in training and, exported (each step's mixed weights computed once),
in inference.

Every training step runs the same images: `batch_size` images of one task, or, with `T`
tasks per step, `batch_size / T` images of each (task-homogeneous batches, as the Trainer
draws them). Times are medians over `repeats` steps after `warmup` steps, and each ratio
compares steps taken alternately (a method's with the plain network's, a T-task step with
a 1-task step), so that a drift in the machine's speed moves both alike.

Peak memory: on a GPU, `torch.cuda.max_memory_allocated` over a step. On the CPU, where
the allocator keeps no such count, the bytes a step holds at its peak are counted: the
parameters, their gradients and the two AdamW moments, plus every distinct tensor autograd
saves for the backward pass (the activations).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from isomod.bench import report
from isomod.core.baselines import PlainResNet
from isomod.bench.base import Bench, Context, Job, register
from isomod.bench.docs import md_table
from isomod.bench.results import Row
from isomod.data.tasks import TaskData
from isomod.errors import IsomodError, check_choice
from isomod.io.export import export_task
from isomod.core.network import ModelConfig, ModularNet, TaskModel, TaskSpec
from isomod.training.regimes import REGIMES, regime
from isomod.training.trainer import PRECISIONS, TrainConfig, Trainer, resolve_device
from isomod.files import write_text_atomic
from isomod import seeds

TRAIN_METHODS = ("plain", "weight_mixing", "grouped", "output_mixing", "discrete", "templates")


@dataclass
class SpeedConfig:
    """What `bench speed` measures.

    Args:
        batch_size: images per training step (split evenly over the step's tasks).
        image_size: side of the random square images.
        num_classes: classes of every task.
        warmup: steps run before timing.
        repeats: timed steps; the median is reported.
        device: `auto`, `cpu` or `cuda`.
        precision: `fp32`, or `bf16` for bfloat16 autocast of training forward passes.
        compile: a `torch.compile` backend for training forward passes; empty for none.
    """

    batch_size: int = 64
    image_size: int = 28
    num_classes: int = 10
    warmup: int = 3
    repeats: int = 10
    device: str = "auto"
    precision: str = "fp32"
    compile: str = ""

    def __post_init__(self):
        check_choice("precision", self.precision, PRECISIONS)
        if min(self.batch_size, self.image_size, self.num_classes - 1, self.repeats) < 1:
            raise IsomodError("batch_size, image_size and repeats must be >= 1, num_classes >= 2")


def build(method: str, config: ModelConfig, num_modules: int, tasks: int, num_classes: int,
          image_size: int, template_regime: str = "templates") -> TaskModel:
    specs = [TaskSpec(f"task{i}", num_classes, (config.in_channels, image_size, image_size)) for i in range(tasks)]
    if method == "plain":
        return PlainResNet(config, specs)
    if method == "templates":
        return ModularNet(REGIMES[template_regime].apply(config, TrainConfig(), modules=num_modules)[0], specs)
    mixing = "output" if method == "output_mixing" else "weight"
    model = ModularNet(replace(config, num_modules=num_modules, mixing=mixing), specs)
    if method == "discrete":
        for i, spec in enumerate(specs):
            model.route(spec.name).set_choice([(i + l) % num_modules for l in range(config.steps)])
    return model


class SavedBytes:
    """Counts the distinct tensors autograd saves for backward (parameters excluded)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude:
            self.seen[ptr] = max(self.seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def random_tasks(model: TaskModel, per_task: int, num_classes: int, seed: int = 0) -> list[TaskData]:
    """Random uint8 images and labels for every task of `model`, a few batches' worth."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in model.task_names:
        spec = model.specs[name]
        x = torch.randint(0, 256, (4 * per_task, *spec.input_shape), generator=g, dtype=torch.uint8)
        y = torch.randint(0, num_classes, (4 * per_task,), generator=g)
        out.append(TaskData(spec, x, y, x[:0], y[:0]))
    return out


@dataclass
class Prepared:
    """A training step ready to time: `step()` runs one optimiser step of the Trainer on one
    batch of every task; `images` per step, `peak` bytes and `macs` multiply-adds of a step."""

    step: Callable[[], None]
    images: int
    peak: int
    macs: int
    done: Callable[[], None]


def prepare_training(model: TaskModel, cfg: SpeedConfig, device: torch.device, seed: int = 0,
                     group_tasks: bool = False) -> Prepared:
    """The Trainer's own optimiser step on `model` (every task in each step, `batch_size /
    T` images of each; with `group_tasks`, as one forward pass), warmed up, its peak bytes
    and its multiply-adds."""
    names = model.task_names
    per_task = cfg.batch_size // len(names)
    if per_task < 1:
        raise IsomodError(f"batch size {cfg.batch_size} cannot be split over {len(names)} tasks")
    train = TrainConfig(steps=10**9, batch_size=per_task, warmup_steps=0, augment=False, checkpoint_every=0,
                        log_every=10**9, device=str(device), precision=cfg.precision, compile=cfg.compile, seed=seed,
                        group_tasks=group_tasks)
    trainer = Trainer(model, random_tasks(model, per_task, cfg.num_classes, seed), train, progress=False)
    run = trainer.start()

    def step():
        trainer.optimizer_step(run, names)

    for _ in range(cfg.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        counter = SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            step()
        peak = sum(p.numel() * p.element_size() for p in params) * 4 + counter.total  # weights, grads, 2 moments
    # Counted on the per-task loop, the same arithmetic: torch's flop counter over-counts
    # the backward pass of a grouped convolution (as if it were not grouped).
    grouped, run.grouped = run.grouped, None
    with FlopCounterMode(display=False) as flops:
        step()
    run.grouped = grouped
    return Prepared(step, per_task * len(names), peak, flops.get_total_flops() // 2, lambda: trainer.finish(run))


PEAK_SIZES = {"cpu": (256, 512, 1024, 2048), "cuda": (2048, 4096, 8192)}
PEAK_CONV_CHANNELS = {"cpu": (64, 128, 256), "cuda": (256, 512, 1024)}  # 3x3 convolutions, 32 images of 28x28
PEAK_REFERENCE = ("the best of square matmuls and of 3x3 convolutions of several sizes, each the best of its "
                  "repeats")


def peak_macs_per_s(cfg: SpeedConfig, device: torch.device) -> float:
    """The device's peak in the training precision, on this thread count: the best
    multiply-adds per second of square matmuls and of 3x3 convolutions of several sizes,
    each the best of several repeats (matmuls alone understated it on a CPU, whose
    convolution kernels ran faster: a plain training step then ran above the reference)."""
    dtype = torch.bfloat16 if cfg.precision == "bf16" and device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    kind = "cuda" if device.type == "cuda" else "cpu"
    work = []  # (call, multiply-adds)
    for n in PEAK_SIZES[kind]:
        a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
        work.append((lambda a=a, b=b: a @ b, n**3))
    for c in PEAK_CONV_CHANNELS[kind]:
        x, w = torch.randn(32, c, 28, 28, generator=g).to(device, dtype), torch.randn(c, c, 3, 3, generator=g).to(device, dtype)
        work.append((lambda x=x, w=w: F.conv2d(x, w, padding=1), 32 * c * c * 9 * 28 * 28))
    best = 0.0
    for call, macs in work:
        call()  # warm-up
        times = []
        for _ in range(max(cfg.repeats, 5)):
            sync(device)
            t0 = time.perf_counter()
            call()
            sync(device)
            times.append(time.perf_counter() - t0)
        best = max(best, macs / min(times))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(calls: list, repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each call, the calls alternating so that all see the same machine
    state (a drift in clock speed or load moves every median alike)."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            sync(device)
            t0 = time.perf_counter()
            call()
            sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def time_inference(nets: list, cfg: SpeedConfig, device: torch.device, shape) -> list[float]:
    """Median seconds of one forward pass of `batch_size` images through each of `nets`
    (callables on a batch), interleaved."""
    x = torch.rand((cfg.batch_size, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    calls = [lambda net=net: net(x) for net in nets]
    for call in calls:
        for _ in range(cfg.warmup):
            call()
    return time_interleaved(calls, cfg.repeats, device)


def train_rows(method: str, n: int, tasks: int, device: torch.device, prepared: Prepared, step_s: float,
               plain: Prepared, plain_step_s: float, peak_macs: float) -> list[Row]:
    """The training rows of one measurement: images per second, step time and peak memory
    as multiples of the plain network's, and the multiply-adds per second the step achieves
    with their ratio to a large matmul's (model-FLOPs utilisation)."""
    achieved = prepared.macs / step_s
    common = {"N": n, "tasks": tasks, "device": device.type, "step_s": round(step_s, 5), "peak_bytes": prepared.peak,
              "macs_per_step": prepared.macs}
    return [Row(method, "all", "train_img_per_s", round(prepared.images / step_s, 1), common),
            Row(method, "all", "train_time_ratio_to_plain", round(step_s / plain_step_s, 3), common),
            Row(method, "all", "peak_mem_ratio_to_plain", round(prepared.peak / plain.peak, 3), common),
            Row(method, "all", "train_macs_per_s", round(achieved), common),
            Row(method, "all", "mfu", round(achieved / peak_macs, 4), {**common, "peak_macs_per_s": round(peak_macs),
                                                                       "peak_reference": PEAK_REFERENCE})]


@dataclass
class SpeedBenchConfig:
    """`isomod bench speed`: every method, pool size and task count, timed against plain.

    Args:
        modules: pool sizes N (the plain network has `steps` blocks whatever N is).
        tasks: tasks per training step.
        template_regime: the template regime the `templates` rows measure.
        model: width, depth and block shape shared by all models.
        speed: batch, image size, repetitions and device.
    """

    modules: list[int] = field(default_factory=lambda: [4, 8, 16])
    tasks: list[int] = field(default_factory=lambda: [1, 8])
    template_regime: str = "templates"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(channels=32, steps=8))
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def __post_init__(self):
        if not self.modules or min(self.modules) < 1 or not self.tasks or min(self.tasks) < 1:
            raise IsomodError("modules and tasks must be non-empty lists of numbers >= 1")
        if regime(self.template_regime).model.get("route_init") != "flat":
            raise IsomodError(f"template_regime must be a template regime, got {self.template_regime!r}")


def measure_training(config: "SpeedBenchConfig", device: torch.device, peak_macs: float, say) -> list[Row]:
    """Every method's training step against plain's, for every pool size and task count."""
    speed = config.speed
    rows = []
    for t in config.tasks:
        plain = make(config, "plain", 1, t, device)
        for n in config.modules:
            prepared = {m: make(config, m, n, t, device) for m in TRAIN_METHODS if m != "plain"}
            # Each method is timed against plain in the same window.
            for method, p in prepared.items():
                t_plain, t_m = time_interleaved([plain.step, p.step], speed.repeats, device)
                rows += train_rows(method, n, t, device, p, t_m, plain, t_plain, peak_macs)
                say(f"{method:>14} N={n:<2} tasks={t}: {p.images / t_m:8.0f} img/s, x{t_m / t_plain:.2f} plain's "
                    f"step, x{p.peak / plain.peak:.2f} plain's memory, MFU {p.macs / t_m / peak_macs:.3f}")
                p.done()
            if n == config.modules[0]:
                t_plain = time_interleaved([plain.step], speed.repeats, device)[0]
                rows += train_rows("plain", n, t, device, plain, t_plain, plain, t_plain, peak_macs)
        plain.done()
    return rows


def make(config: "SpeedBenchConfig", method: str, n: int, t: int, device: torch.device) -> Prepared:
    seeds.seed(0)
    speed = config.speed
    return prepare_training(build(method, config.model, n, t, speed.num_classes, speed.image_size,
                                  config.template_regime), speed, device, group_tasks=method == "grouped")


def measure_multitask(config: "SpeedBenchConfig", device: torch.device, say) -> list[Row]:
    """A T-task step against a 1-task step of the same method and number of images, timed together."""
    rows = []
    for t in [t for t in config.tasks if t != 1] if 1 in config.tasks else []:
        for n in config.modules:
            for method in TRAIN_METHODS:
                one, many = make(config, method, n, 1, device), make(config, method, n, t, device)
                t_one, t_many = time_interleaved([one.step, many.step], config.speed.repeats, device)
                one.done(), many.done()
                rows.append(Row(method, "all", "multitask_time_ratio", round(t_many / t_one, 3),
                                {"N": n, "tasks": t, "device": device.type}))
                say(f"{method:>14} N={n:<2}: a {t}-task step takes x{t_many / t_one:.2f} a 1-task step")
    return rows


def measure_inference(config: "SpeedBenchConfig", device: torch.device, say) -> list[Row]:
    """Inference of a discrete ModularNet and of exported discrete and template routes against plain's."""
    speed, model_config = config.speed, config.model
    shape = (model_config.in_channels, speed.image_size, speed.image_size)
    rows = []
    for n in config.modules:
        seeds.seed(0)
        plain = build("plain", model_config, 1, 1, speed.num_classes, speed.image_size).to(device).eval()
        modular = build("discrete", model_config, n, 1, speed.num_classes, speed.image_size).to(device).eval()
        soft = build("templates", model_config, n, 1, speed.num_classes, speed.image_size,
                     config.template_regime).to(device).eval()
        exported, exported_soft = export_task(modular, "task0"), export_task(soft, "task0")
        times = time_inference([lambda x: plain(x, "task0"), lambda x: modular(x, "task0"), exported, exported_soft],
                               speed, device, shape)
        for method, t_m in zip(("plain", "discrete", "exported", "exported_templates"), times):
            rows.append(Row(method, "all", "infer_time_ratio_to_plain", round(t_m / times[0], 3),
                            {"N": n, "tasks": 1, "device": device.type,
                             "infer_img_per_s": round(speed.batch_size / t_m, 1)}))
        say(f"inference N={n}: exported x{times[2] / times[0]:.3f} plain, exported templates "
            f"x{times[3] / times[0]:.3f}, discrete ModularNet x{times[1] / times[0]:.3f}")
    return rows


def measure(config: "SpeedBenchConfig", progress: bool) -> list[Row]:
    """Every measurement of the bench, in one process (timings compare within it)."""
    device = resolve_device(config.speed.device)
    say = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    peak = peak_macs_per_s(config.speed, device)
    say(f"peak ({PEAK_REFERENCE}): {peak / 1e9:.2f} G multiply-adds/s")
    rows = (measure_training(config, device, peak, say) + measure_multitask(config, device, say)
            + measure_inference(config, device, say))
    for row in rows:
        row.fields["block"] = config.model.block
    return rows


def describe(config: "SpeedBenchConfig", inputs: dict) -> dict:
    return {**asdict(config), "device": str(resolve_device(config.speed.device)), "threads": torch.get_num_threads()}


def plan(ctx: Context):
    """One job, in this process: the timings compare with each other, measured together."""
    yield [Job(measure, (ctx.config, ctx.progress), lambda results, rows: results.add(*rows))]


def value(rows: list[dict], method: str, n: int, tasks: int, metric: str) -> float | None:
    return next((r["value"] for r in rows if r["method"] == method and r["N"] == n and r["tasks"] == tasks
                 and r["metric"] == metric), None)


def markdown_table(results: dict) -> str:
    rows = results["rows"]
    cfg = results["config"]
    body = []
    for t in cfg["tasks"]:
        for n in cfg["modules"]:
            for method in TRAIN_METHODS:
                if (method == "plain" and n != cfg["modules"][0]) or value(rows, method, n, t, "train_img_per_s") is None:
                    continue
                multi = value(rows, method, n, t, "multitask_time_ratio")
                macs, mfu = value(rows, method, n, t, "train_macs_per_s"), value(rows, method, n, t, "mfu")
                body.append([method, "-" if method == "plain" else n, t,
                             f"{value(rows, method, n, t, 'train_img_per_s'):,.0f}",
                             f"{value(rows, method, n, t, 'train_time_ratio_to_plain'):.2f}",
                             f"{value(rows, method, n, t, 'peak_mem_ratio_to_plain'):.2f}",
                             "" if multi is None else f"{multi:.2f}", "" if macs is None else f"{macs / 1e9:.2f}",
                             "" if mfu is None else f"{mfu:.3f}"])
    lines = md_table(["method", "N", "tasks / step", "img/s", "step time / plain", "peak memory / plain",
                      "T-task step / 1-task step", "G multiply-adds / s", "MFU"], body, "lrrrrrrrr")
    peak = next((r for r in rows if r["metric"] == "mfu"), None)
    if peak:
        reference = (f"{peak['peak_reference']}: " if "peak_reference" in peak else "a large matmul's ")
        lines += ["", f"MFU: the multiply-adds a training step executes (forward and backward, weight mixing "
                  f"included, counted by torch's flop counter) per second, over {reference}"
                  f"{peak['peak_macs_per_s'] / 1e9:.2f} G multiply-adds/s" + (", measured in the same run."
                                                                              if "peak_reference" in peak else
                                                                              " measured in the same run.")]
    body = [[f"{method} / plain", *(f"{value(rows, method, n, 1, 'infer_time_ratio_to_plain'):.3f}"
                                    for n in cfg["modules"])]
            for method in ("discrete", "exported", "exported_templates")
            if value(rows, method, cfg["modules"][0], 1, "infer_time_ratio_to_plain") is not None]  # else: written before it existed
    lines += ["", *md_table(["inference", *(f"N={n}" for n in cfg["modules"])], body, "l" + "r" * len(cfg["modules"]))]
    return "\n".join(lines)


HEADLINES = (("weight_mixing", "train_time_ratio_to_plain", "weight-mixing training step / plain's"),
             ("grouped", "train_time_ratio_to_plain", "weight-mixing step with the tasks grouped / plain's"),
             ("templates", "train_time_ratio_to_plain", "template-regime training step / plain's"),
             ("exported_templates", "infer_time_ratio_to_plain", "exported template route's inference / plain's"),
             ("weight_mixing", "multitask_time_ratio", "weight mixing, a T-task step / a 1-task step"),
             ("exported", "infer_time_ratio_to_plain", "exported inference / plain's"),
             ("weight_mixing", "peak_mem_ratio_to_plain", "weight-mixing peak training memory / plain's"))


def checks(results: dict) -> list[str]:
    """The headline ratios: the worst (largest) measured value of each."""
    lines = []
    for method, metric, text in HEADLINES:
        values = [r["value"] for r in results["rows"] if r["method"] == method and r["metric"] == metric]
        if values:
            lines.append(f"{text}: worst {max(values):.3f}")
    return lines


def summary(results: dict) -> str:
    return "\n".join([markdown_table(results), *checks(results)])


def write_report(out: Path, results: dict) -> Path:
    cfg = results["config"]
    plot_speed(results["rows"], out / "speed.png")
    parts = [f"# isomod bench speed ({cfg['device']}, {cfg['threads']} threads)", "",
             f"Width {cfg['model']['channels']}, {cfg['model']['steps']} steps, {cfg['speed']['batch_size']} images of "
             f"{cfg['speed']['image_size']}x{cfg['speed']['image_size']} per training step; medians of "
             f"{cfg['speed']['repeats']} steps.", "", markdown_table(results), "", "## Headline ratios", ""]
    parts += [f"- {line}" for line in checks(results)] + ["", "![speed](speed.png)", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def plot_speed(rows: list[dict], path: Path) -> Path:
    """Training step time and peak memory as multiples of the plain network's (the black
    line at 1), against the pool size N; one line per method, solid for 1 task per step,
    dashed for more."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"weight_mixing": "tab:red", "grouped": "tab:orange", "output_mixing": "tab:blue", "discrete": "tab:green", "templates": "tab:purple"}
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
    return report.save_figure(fig, path)


BENCH = register(Bench("speed", "training and inference speed and memory of routes against a plain isometric ResNet",
                       SpeedBenchConfig, plan, write_report, summary, unprefixed="speed", describe=describe,
                       device=lambda c: c.speed.device, resume=False, hidden=("model.num_modules",)))
run = BENCH.run
