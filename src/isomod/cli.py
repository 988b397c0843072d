"""The `isomod` command.

    isomod demo                      train on `glyphs` with the baselines, write runs/demo/
    isomod train --tasks glyphs --out runs/x [--config cfg.yaml] [--steps 500] [--resume] [--image-size 224]
                 (model options take a prefix: --model-channels 16 --model-steps 6)
    isomod eval --from runs/x/checkpoint
    isomod export --from runs/x/checkpoint --task glyphs/greek --format torchscript|onnx --out greek.pt
    isomod transfer --from runs/x/checkpoint --task uci-digits [--shots 10] --out runs/y
    isomod adapt --from runs/x/checkpoint --target digits5/mnistm --out runs/z [--method route_select]
    isomod bench NAME --out runs/bench-NAME [--config cfg.yaml] [options]   (NAME: see `isomod bench --help`;
                 each bench's options come from its config dataclass in isomod/bench/NAME.py)
    torchrun --nproc_per_node=P -m isomod train|bench reuse ...   data-parallel over P processes
    isomod report runs/bench-mtl [--docs docs/results/mtl.md]   redraw figures and report.md from results.json
    isomod tasks                     list registered suites and tasks
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from isomod.adapt import ADAPT, ADAPT_TRAIN
from isomod.config import add_config_args, build_config, positive
from isomod.errors import IsomodError, check_out_file
from isomod.network import ModelConfig
from isomod.regimes import REGIMES, regime
from isomod.search import SearchConfig
from isomod.train import TrainConfig
from isomod.transfer import TRANSFER, TRANSFER_TRAIN


@dataclasses.dataclass
class TrainRun:
    """`isomod train`.

    Args:
        model: the modular network's shape.
        train: the training budget and schedule.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


@dataclasses.dataclass
class TransferRun:
    """`isomod transfer`.

    Args:
        train: the new task's training budget.
        search: how `--method route_search` searches (isomod.search); its seed is the run's.
    """

    train: TrainConfig = dataclasses.field(default_factory=lambda: TRANSFER_TRAIN)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)


@dataclasses.dataclass
class AdaptRun:
    """`isomod adapt`.

    Args:
        train: the budget of the methods that train.
    """

    train: TrainConfig = dataclasses.field(default_factory=lambda: ADAPT_TRAIN)


def cmd_tasks(args) -> int:
    from isomod.data.tasks import SUITES, TASKS

    print("suites:")
    for name, tasks in SUITES.items():
        print(f"  {name}: {', '.join(tasks)}")
    print("tasks:", ", ".join(TASKS))
    print("or a path: a folder of class sub-folders of images, or an .npz with x_train, y_train, x_test, y_test")
    return 0


def cmd_train(args) -> int:
    import torch

    from isomod.data.tasks import load_task, resolve
    from isomod.network import ModularNet
    from isomod.train import Trainer, check_out_dir

    base = TrainRun()
    if args.regime:
        base = TrainRun(*regime(args.regime).apply(base.model, base.train))
    cfg = build_config(args, base)
    model_cfg, train_cfg = cfg.model, cfg.train
    check_out_dir(Path(args.out))
    tasks = [load_task(n, data_dir=args.data_dir, image_size=args.image_size) for n in resolve(args.tasks)]
    channels = {t.spec.input_shape[0] for t in tasks}
    if len(channels) > 1:
        raise IsomodError(f"tasks mix {sorted(channels)}-channel inputs; one model takes one channel count")
    model_cfg = dataclasses.replace(model_cfg, in_channels=channels.pop())
    torch.manual_seed(train_cfg.seed)  # the seed fixes the initial weights too, not only the batches
    model = ModularNet(model_cfg, [t.spec for t in tasks])
    trainer = Trainer(model, tasks, train_cfg, out_dir=args.out, progress=not args.no_progress)
    accs = trainer.fit(resume=args.resume)
    if not trainer.main:
        return 0
    for name in model.task_names:
        print(f"{model.route_str(name)}    test acc {accs[name]:.3f}")
    print(f"mean test acc {sum(accs.values()) / len(accs):.3f}; checkpoint: {trainer.checkpoint_path}")
    return 0


def cmd_eval(args) -> int:
    from isomod.checkpoint import load_checkpoint
    from isomod.data.tasks import load_task, resolve
    from isomod.train import evaluate

    if args.limit < 0:
        raise IsomodError(f"--limit must be >= 0 (0: every image), got {args.limit}")
    model = load_checkpoint(args.from_)
    names = resolve(args.tasks) if args.tasks else model.task_names
    tasks = {n: evaluation_images(load_task(model.check_task(n).source or n, data_dir=args.data_dir), args.split,
                                  args.limit) for n in names}
    accs = evaluate(model, tasks)
    for name, acc in accs.items():
        print(f"{name}: {args.split} acc {acc:.4f}" + (f"   route {model.route(name)}" if model.has_routes else ""))
    if args.diagnostics:
        from isomod import diagnostics

        d = diagnostics.summary(model, tasks)
        print(f"route distance {d['route_distance']:.3f} (mean total variation between tasks' routes); "
              f"{args.split} acc with its own route {d['own']:.4f}, with another task's route {d['other']:.4f}, "
              f"with its own route's steps shuffled {sum(d['shuffled'].values()) / len(d['shuffled']):.4f}")
    return 0


def evaluation_images(data, split: str, limit: int):
    """`data` with the images of `split` (a fixed random `limit` of them when `limit` > 0)
    as its test split, the one `evaluate` and the diagnostics read."""
    import torch

    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    if 0 < limit < len(y):
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:limit]
        x, y = x[keep], y[keep]
    return dataclasses.replace(data, x_test=x, y_test=y)


def cmd_transfer(args) -> int:
    from isomod.checkpoint import load_checkpoint
    from isomod.data.tasks import load_task
    from isomod.train import check_out_dir
    from isomod.transfer import few_shot, transfer

    run = build_config(args, TransferRun())
    train_cfg = run.train
    check_out_dir(Path(args.out))
    model = load_checkpoint(args.from_)
    model.require_routes(f"{args.from_}: transfer")
    if args.source is not None:
        model.check_task(args.source)
    task = load_task(args.task, data_dir=args.data_dir)
    model.check_spec(task.spec, model.config.in_channels)
    task = few_shot(task, args.shots, seed=train_cfg.seed)
    before = model.param_count()
    options = {"search": dataclasses.replace(run.search, seed=train_cfg.seed)} \
        if args.method in ("route_search", "stats_head") else {}
    result = transfer(model, task, args.method, train_cfg, source=args.source, out_dir=args.out,
                      progress=not args.no_progress, **options)
    out = Path(args.out) / "checkpoint"
    print(f"{task.name}: test acc {result.test_acc:.4f}    route {result.model.route(task.name)}    "
          f"(started from task {result.source})")
    if "candidates" in result.info:
        i = result.info
        print(f"route search ({i['strategy']}, {i['proxy']} proxy): {i['candidates']} routes scored in "
              f"{i['search_seconds']:.1f} s; proxy {i['proxy_start']:.3f} at the start, {i['proxy_found']:.3f} found")
    print(f"added {result.params_task:,} parameters ({100 * result.params_task / before:.2f}% of the {before:,} before); "
          f"checkpoint: {out} (holds {len(result.model.task_names)} task(s))")
    return 0


def cmd_adapt(args) -> int:
    from isomod.adapt import adapt, check_target
    from isomod.checkpoint import load_checkpoint, save_checkpoint
    from isomod.data.tasks import load_task
    from isomod.train import check_out_dir, evaluate

    train_cfg = build_config(args, AdaptRun()).train
    check_out_dir(Path(args.out))
    model = load_checkpoint(args.from_)
    model.require_routes(f"{args.from_}: domain adaptation")
    target = load_task(args.target, data_dir=args.data_dir)
    sources = None
    if ADAPT[args.method].setting == "with_sources":  # the model's domains of the target's label space, by name
        names = check_target(model, target.spec, len(target.x_train))
        sources = {n: load_task(n, data_dir=args.data_dir) for n in names}
    res = adapt(model, target, args.method, train_cfg, out_dir=args.out, progress=not args.no_progress,
                sources=sources)
    out = save_checkpoint(model, Path(args.out) / "checkpoint", extra={"adapted": target.name, "method": args.method})
    acc = evaluate(model, {target.name: target})[target.name]  # the target's labels are read here, and only here
    scores = ", ".join(f"{n} {v:.3f}" for n, v in res.scores.items())
    print(f"{target.name}: {args.method} started from {res.source} (by {res.score}, lower is better: {scores})")
    print(f"route {model.route(target.name)}    test acc {acc:.4f} (labels used for this line only)")
    if res.kept is not None:
        print("the learned route scored better than its start and was kept" if res.kept else
              f"the learned route scored worse than its start ({res.source}'s route), which was restored")
    if ADAPT[args.method].setting == "with_sources" and not ADAPT[args.method].learns_route:
        print(f"the adaptation changed {res.params_task:,} numbers (the whole network, trained on the sources' labels "
              f"too); checkpoint: {out}")
    else:
        print(f"the target changed {res.params_task:,} numbers; pool, stem, head and sources are unchanged; "
              f"checkpoint: {out}")
    return 0


def cmd_export(args) -> int:
    import torch

    from isomod.checkpoint import load_checkpoint
    from isomod.export import example_input, export_task, save_onnx, save_torchscript

    check_out_file(Path(args.out))
    model = load_checkpoint(args.from_).eval()
    model.check_task(args.task)
    net = export_task(model, args.task)
    x = example_input(model, args.task, batch=8)
    with torch.no_grad():
        diff = (net(x) - model(x, args.task)).abs().max().item()
    out = save_torchscript(net, args.out) if args.format == "torchscript" else save_onnx(net, args.out, x[:2])
    stored = len(list(net.parameters()))  # parameters() yields a shared tensor once
    what = (f"a soft route, each of the {len(net.route)} steps stored as its own mixture of modules" if net.soft
            else f"{len(set(net.route))} distinct modules for {len(net.route)} steps")
    print(f"{args.task}: route {' '.join(map(str, net.route))}{' (argmax of soft)' if net.soft else ''}; "
          f"{stored} weight tensors, {sum(p.numel() for p in net.parameters()):,} parameters ({what})")
    print(f"max abs difference from the model on 8 random inputs: {diff:.2e}; wrote {out} ({args.format})")
    return 0


def cmd_bench(args) -> int:
    from isomod import distributed
    from isomod.bench import registry

    bench = registry()[args.bench]
    config = build_config(args, bench.config())
    results = bench.run(args.out, config, progress=not args.no_progress)
    if distributed.is_main():
        print(bench.summary(results))
        print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    return 0


def cmd_demo(args) -> int:
    from isomod.bench import mtl
    from isomod.data.tasks import load_suite

    config = build_config(args, demo_config())
    print("isomod demo: a modular network, independent networks and a shared trunk on the 'glyphs' suite")
    print("(8 scripts rendered from matplotlib's fonts; test images use font faces never seen in training)")
    tasks = load_suite(config.suite)
    for t in tasks:
        print(f"  {t.name}: {t.spec.num_classes} classes, {len(t.y_train)} train / {len(t.y_test)} test images")
    results = mtl.run(args.out, config, tasks=tasks, progress=not args.no_progress)
    print()
    print(mtl.summary(results))
    routes = results["routes"][f"s{config.seeds[0]}"]["discrete"]
    print("\nlearned routes (module per step):")
    for name, r in routes.items():
        print(f"  {name}: {' '.join(map(str, r))}")
    out = Path(args.out)
    print(f"\nreport: {out / 'report.md'}\ncheckpoint: {out / 'runs' / f'modular-s{config.seeds[0]}' / 'checkpoint'}")
    return 0


def demo_config():
    """The demo: the MTL benchmark's configuration with its first seed only and 3,000 steps
    instead of 10,000, so that it takes a third of one seed's time (the benchmark's budget
    is where accuracy stops moving; the demo's is not)."""
    from isomod.bench.mtl import MtlConfig

    config = MtlConfig(seeds=[0])
    config.train = dataclasses.replace(config.train, steps=3000, eval_every=1000, checkpoint_every=1000)
    return config


def cmd_report(args) -> int:
    from isomod.bench import registry
    from isomod.bench.base import read_results, write_docs

    path = Path(args.dir)
    file = path if path.suffix == ".json" else path / "results.json"
    results = read_results(file)
    benches = registry()
    if results["bench"] not in benches:
        raise IsomodError(f"{file}: unknown benchmark {results['bench']!r}; known: {', '.join(benches)}")
    bench = benches[results["bench"]]
    out = Path(args.out) if args.out else (None if path.suffix == ".json" else path)
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            print(f"wrote {bench.write_report(out, results)}")
        block = bench.summary(results)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise IsomodError(f"{file}: not what `isomod bench {bench.name}` writes "
                          f"({type(exc).__name__}: {exc})") from None
    if args.docs:
        write_docs(Path(args.docs), args.dir, results, block)
        print(f"wrote {args.docs}")
    if out is None and not args.docs:
        raise IsomodError(f"{file}: give --out DIR for the report and figures, or --docs PAGE for a docs page's tables")
    return 0


def with_config(p: argparse.ArgumentParser, base, unprefixed: str = "train", data_dir: bool = True):
    """A command's `--config`, `--no-progress`, `--data-dir` and its config dataclass's options."""
    p.add_argument("--config", help="YAML or JSON file with any of the options below, nested by section "
                   "(e.g. `seeds: [0, 1]`, `train: {steps: 500}`); options on the command line win")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    if data_dir:
        add_data_dir(p)
    add_config_args(p, base, unprefixed)
    return p


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where to look first for data that is not embedded (Fashion-MNIST's "
                   "IDX files); then $ISOMOD_DATA, then /usr/share/datasets")


def add_demo(sub) -> None:
    p = with_config(sub.add_parser("demo", help="the main job: modular vs baselines on glyphs, with a report"),
                    demo_config(), data_dir=False)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.set_defaults(func=cmd_demo)


def add_train(sub) -> None:
    p = with_config(sub.add_parser("train", help="train a modular network on tasks or suites"), TrainRun())
    p.add_argument("--tasks", nargs="+", required=True, help="task or suite names, or paths to folders / .npz")
    p.add_argument("--out", required=True, help="run folder: checkpoint/, log.jsonl, TensorBoard events, "
                   "train_config.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--image-size", type=positive, help="side a folder's images are resized to (default 28)")
    p.add_argument("--regime", choices=tuple(REGIMES), help="a route regime (isomod.regimes): its pool size, "
                   "route start and route schedule replace the defaults below; the config file and options "
                   "still win")
    p.set_defaults(func=cmd_train)


def add_transfer(sub) -> None:
    p = with_config(sub.add_parser("transfer", help="add a task to a trained model, learning only its route, "
                                   "norms and head"), TransferRun())
    p.add_argument("--from", dest="from_", required=True, help="checkpoint folder of a trained ModularNet")
    p.add_argument("--task", required=True, help="the new task: a registered name, a folder or an .npz")
    p.add_argument("--shots", type=positive, help="training images per class (default: all)")
    p.add_argument("--source", "--init-from", dest="source",
                   help="the checkpoint's task to start from (its norms; its route for the baselines); "
                        "default: the one whose features separate the new classes best")
    p.add_argument("--method", default="route_only", choices=TRANSFER.names(),
                   help=f"default route_only. {TRANSFER.help()}")
    p.add_argument("--out", required=True, help="run folder for the new checkpoint and log")
    p.set_defaults(func=cmd_transfer)


def add_adapt(sub) -> None:
    p = with_config(sub.add_parser("adapt", help="add an unlabelled target domain to a multi-source model by "
                                   "re-ordering its modules (pool, stem and head unchanged)"), AdaptRun())
    p.add_argument("--from", dest="from_", required=True, help="checkpoint of a ModularNet trained on source domains")
    p.add_argument("--target", required=True, help="the new domain, e.g. digits5/mnistm; its labels are read only to "
                   "report the final test accuracy")
    p.add_argument("--method", default="route_select", choices=ADAPT.names(),
                   help="default route_select. Source-free methods read the target's images only; with_sources ones "
                        f"also the sources' labelled images (loaded by the model's domain names). {ADAPT.help()}")
    p.add_argument("--out", required=True, help="run folder for the new checkpoint and log")
    p.set_defaults(func=cmd_adapt)


def add_export(sub) -> None:
    from isomod.export import EXPORT_FORMATS

    p = sub.add_parser("export", help="a task's route as a standalone TorchScript or ONNX network")
    p.add_argument("--from", dest="from_", required=True, help="checkpoint folder of a ModularNet")
    p.add_argument("--task", required=True, help="the task to export (a soft route needs weight mixing)")
    p.add_argument("--format", default="torchscript", choices=EXPORT_FORMATS,
                   help="torchscript (torch.jit.load, no isomod needed) or onnx (onnxruntime; needs the onnx and "
                        "onnxscript packages)")
    p.add_argument("--out", required=True, help="file to write")
    p.set_defaults(func=cmd_export)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a checkpoint on its tasks")
    p.add_argument("--from", dest="from_", required=True, help="checkpoint folder")
    p.add_argument("--tasks", nargs="*", help="tasks to evaluate (default: all of the checkpoint's)")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--limit", type=int, default=0,
                   help="at most this many images per task, a fixed random sample (default 0: all)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also whether the routes carry the tasks: the distance between tasks' routes, each task "
                        "run with the other tasks' routes, and with its own route's steps shuffled")
    add_data_dir(p)
    p.set_defaults(func=cmd_eval)


def add_bench(sub) -> None:
    from isomod.bench import registry

    benches = registry()
    bench = sub.add_parser("bench", help=f"run a benchmark: {', '.join(benches)}").add_subparsers(
        dest="bench", required=True, metavar="{" + ",".join(benches) + "}")
    for name, b in benches.items():
        p = with_config(bench.add_parser(name, help=b.help), b.config(), b.unprefixed, data_dir=False)
        p.add_argument("--out", required=True, help="output folder for results.json, report.md, figures")
        p.set_defaults(func=cmd_bench)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="redraw report.md and figures from a run folder's results.json, or "
                       "a docs page's tables from a results file (docs/results/NAME.json)")
    p.add_argument("dir", metavar="PATH", help="a bench's output folder, or a results .json file")
    p.add_argument("--docs", help="also rewrite the generated tables of this docs/results/<bench>.md page")
    p.add_argument("--out", help="folder for report.md and the figures (default: PATH when it is a folder)")
    p.set_defaults(func=cmd_report)


def add_tasks(sub) -> None:
    p = sub.add_parser("tasks", help="list suites and tasks")
    p.set_defaults(func=cmd_tasks)


COMMANDS = (add_demo, add_train, add_eval, add_transfer, add_adapt, add_export, add_bench, add_report, add_tasks)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isomod", description="Compositional modular networks: "
                                     "a pool of residual modules, a learned route per task.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except IsomodError as exc:
        print(f"isomod: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("isomod: interrupted; the last checkpoint written stays on disk", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
