"""The `isomod` command.

    isomod demo                      train on `glyphs` with the baselines, write runs/demo/
    isomod train --tasks glyphs --out runs/x [--config cfg.yaml] [--steps 500] [--resume [--extend]] [--force]
                 (model options take a prefix: --model-channels 16 --model-steps 6)
    isomod eval --from runs/x [--tasks T] [--data PATH] [--diagnostics]
    isomod predict --from runs/x --task T IMAGE_OR_FOLDER... [--top 3] [--json]
    isomod export --from runs/x --task glyphs/greek --format torchscript|onnx --out greek.pt
    isomod task list|add|remove --from runs/x [TASK_FOLDER... | TASK...] [--out runs/x2]   task files in and out
    isomod transfer --from runs/x --task uci-digits [--shots 10] [--method route_search] --out runs/y
    isomod adapt --from runs/x --target digits5/mnistm --out runs/z [--method route_select] [--shots 10]
    isomod bench NAME --out runs/bench-NAME [--config cfg.yaml] [options]   (NAME: see `isomod bench --help`;
                 each bench's options come from its config dataclass in isomod/bench/NAME.py)
    torchrun --nproc_per_node=P -m isomod train|bench reuse ...   data-parallel over P processes
    isomod report runs/bench-mtl [--docs docs/results/mtl.md]   redraw figures and report.md from results.json
    isomod tasks                     list registered suites and tasks

The model commands live in `isomod.cli.model`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from isomod.methods.adapt import ADAPT
from isomod.cli.model import (ONE_TASK, AdaptRun, TrainRun, TransferRun, add_image_size, add_label_space,
                              add_run_folder_options, cmd_adapt, cmd_eval, cmd_export, cmd_predict, cmd_train,
                              cmd_transfer)
from isomod.cli.options import add_config_args, build_config, positive
from isomod.errors import Interrupted, IsomodError
from isomod.training.regimes import REGIMES
from isomod.methods.transfer import TRANSFER


def cmd_tasks(args) -> int:
    from isomod.data.tasks import SUITES, TASKS

    print("suites:")
    for name, tasks in SUITES.items():
        print(f"  {name}: {', '.join(tasks)}")
    print("tasks:", ", ".join(TASKS))
    print("or a path: a folder of class sub-folders of images, or an .npz with x_train, y_train, x_test, y_test")
    return 0


def cmd_bench(args) -> int:
    from isomod import distributed
    from isomod.bench import registry

    bench = registry()[args.bench]
    config = build_config(args, bench.config())
    results = bench.run(args.out, config, progress=not args.no_progress, force=args.force)
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
    print("\nlearned routes (module per step):")
    for name, r in mtl.learned_routes(results, config.seeds[0]).items():
        print(f"  {name}: {' '.join(map(str, r))}")
    out = Path(args.out)
    print(f"\nreport: {out / 'report.md'}\ncheckpoint: {mtl.run_dir(out, 'modular', config.seeds[0]) / 'checkpoint'}")
    return 0


DEMO_HIDDEN = ("train.seed", "model.num_modules")  # set per run, or by each method's regime


def demo_config():
    """The demo: the MTL benchmark's configuration with its first seed only, 1,600 steps of 64
    images instead of 10,000 of 128, and route diagnostics on 250 test images a task, so that
    it runs in about 3 minutes on 2 CPU cores (the benchmark's budget is where accuracy stops
    moving; the demo's is not)."""
    from isomod.bench.mtl import MtlConfig

    config = MtlConfig(seeds=[0], diagnostics_images=250)
    config.train = dataclasses.replace(config.train, steps=1600, batch_size=64, eval_every=800, checkpoint_every=400)
    return config


def cmd_report(args) -> int:
    from isomod.bench import registry
    from isomod.bench.docs import write_docs
    from isomod.bench.results import read_results

    if args.claims:
        return report_claims(args)
    if args.dir is None:
        raise IsomodError("give a bench's output folder or a results file (or --claims)")
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


def report_claims(args) -> int:
    """`isomod report --claims [FOLDER]`: every registered claim evaluated on FOLDER's results
    files (default docs/results); `--readme` rewrites the README's summary from them."""
    from isomod.bench import claims

    verdicts = claims.evaluate(args.dir or "docs/results", args.names or None)
    print(claims.as_json(verdicts) if args.json else claims.table(verdicts))
    if args.readme:
        claims.write_readme(args.readme, claims.readme_block(verdicts))
        print(f"wrote {args.readme}")
    return 0


def with_config(p: argparse.ArgumentParser, base, unprefixed: str = "train", data_dir: bool = True,
                hidden: tuple[str, ...] = ()):
    """A command's `--config`, `--no-progress`, `--data-dir` and its config dataclass's options."""
    p.add_argument("--config", help="YAML or JSON file with any of the options below, nested by section "
                   "(e.g. `seeds: [0, 1]`, `train: {steps: 500}`); options on the command line win")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    if data_dir:
        add_data_dir(p)
    add_config_args(p, base, unprefixed, hidden)
    return p


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where to look first for data that is not embedded (Fashion-MNIST's "
                   "IDX files); then $ISOMOD_DATA, then /usr/share/datasets")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="auto (CUDA when present), cpu or cuda (default cpu)")


def add_demo(sub) -> None:
    p = with_config(sub.add_parser("demo", help="the main job: modular vs baselines on glyphs, with a report"),
                    demo_config(), data_dir=False, hidden=DEMO_HIDDEN)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.set_defaults(func=cmd_demo, force=False)


def add_train(sub) -> None:
    p = with_config(sub.add_parser("train", help="train a modular network on tasks or suites"), TrainRun())
    p.add_argument("--tasks", nargs="+", required=True, help="task or suite names, or paths to folders / .npz")
    p.add_argument("--out", required=True, help="run folder: checkpoint/, log.jsonl, TensorBoard events, "
                   "train_config.json (the budget, tasks, model, regime and command)")
    add_run_folder_options(p, resume=True)
    add_image_size(p, "28")
    add_label_space(p)
    p.add_argument("--regime", choices=tuple(REGIMES), help="a route regime (isomod.training.regimes; default annealed): its "
                   "pool size, route start and route schedule replace the defaults below; the config file and "
                   "options still win")
    p.set_defaults(func=cmd_train)


def add_transfer(sub) -> None:
    p = with_config(sub.add_parser("transfer", help="add a task to a trained model, learning only its route, "
                                   "norms and head"), TransferRun(), hidden=ONE_TASK)
    p.add_argument("--from", dest="from_", required=True, help="a ModularNet's checkpoint or run folder")
    p.add_argument("--task", required=True, help="the new task: a registered name, a folder or an .npz")
    p.add_argument("--shots", type=positive, help="training images per class (default: all)")
    p.add_argument("--source", "--init-from", dest="source",
                   help="the checkpoint's task to start from (its norms; its route for the baselines); "
                        "default: the one whose features separate the new classes best")
    p.add_argument("--method", default=TRANSFER.default(), choices=TRANSFER.names(),
                   help=f"default {TRANSFER.default()}. {TRANSFER.help()}")
    p.add_argument("--out", required=True, help="run folder for the new checkpoint and log")
    add_run_folder_options(p)
    add_image_size(p, "the size the model's tasks were trained at")
    add_label_space(p)
    p.set_defaults(func=cmd_transfer)


def add_adapt(sub) -> None:
    p = with_config(sub.add_parser("adapt", help="add an unlabelled target domain to a multi-source model by "
                                   "re-ordering its modules (pool, stem and head unchanged)"), AdaptRun(),
                    hidden=ONE_TASK)
    p.add_argument("--from", dest="from_", required=True, help="a ModularNet trained on source domains: its "
                   "checkpoint or run folder")
    p.add_argument("--target", required=True, help="the new domain, e.g. digits5/mnistm, or your folder / .npz with "
                   "--label-space; its test labels are read only to report the final test accuracy")
    p.add_argument("--method", default=ADAPT.default(), choices=ADAPT.names(),
                   help=f"default {ADAPT.default()}. source_free methods read the target's images only; with_sources ones "
                        "also the sources' labelled images (loaded by the model's domain names); few_labels ones "
                        f"--shots labelled target images per class. {ADAPT.help()}")
    p.add_argument("--shots", type=positive, help="few_labels methods: labelled target training images per class")
    p.add_argument("--sources-train", action="store_true", help="route_moment, route_adversarial: stem, pool, head "
                   "and the sources keep training on the sources' labels while the target's route aligns")
    p.add_argument("--out", required=True, help="run folder for the new checkpoint and log")
    add_run_folder_options(p)
    add_image_size(p, "the size the model's tasks were trained at")
    add_label_space(p)
    p.set_defaults(func=cmd_adapt)


def add_export(sub) -> None:
    from isomod.io.export import EXPORT_FORMATS

    p = sub.add_parser("export", help="a task's route as a standalone TorchScript or ONNX network")
    p.add_argument("--from", dest="from_", required=True, help="a ModularNet's checkpoint or run folder")
    p.add_argument("--task", help="the task to export (a soft route needs weight mixing); default: the one "
                   "--task-file adds")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="several tasks in one TorchScript file, which takes "
                   "the index of each image's task beside the images (ONNX: one task a file)")
    add_task_file(p)
    p.add_argument("--format", default="torchscript", choices=EXPORT_FORMATS,
                   help="torchscript (torch.jit.load, no isomod needed) or onnx (onnxruntime; needs the onnx and "
                        "onnxscript packages)")
    p.add_argument("--out", required=True, help="file to write")
    add_device(p)
    p.set_defaults(func=cmd_export)


def add_task_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-file", action="append", metavar="DIR",
                   help="a task folder (task.json, task.safetensors) to add to the --from checkpoint first; it loads "
                        "only onto the pool it was learned on (repeatable)")


def add_task(sub) -> None:
    from isomod.cli.model import cmd_task

    p = sub.add_parser("task", help="list a checkpoint's tasks, add task files to it, or remove tasks (--out)")
    p.add_argument("action", choices=("list", "add", "remove"))
    p.add_argument("items", nargs="*", metavar="TASK", help="add: task folders; remove: task names")
    p.add_argument("--from", dest="from_", required=True, help="a ModularNet's checkpoint or run folder")
    p.add_argument("--out", help="add, remove: the new checkpoint folder (the --from one is never changed)")
    p.set_defaults(func=cmd_task)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a checkpoint on its tasks")
    p.add_argument("--from", dest="from_", required=True, help="a checkpoint or run folder")
    p.add_argument("--tasks", nargs="*", help="tasks to evaluate (default: those --task-file adds, else all of the "
                   "checkpoint's)")
    add_task_file(p)
    p.add_argument("--data", help="one task's images from here instead (a folder of class sub-folders, train/ and "
                   "test/ folders, or an .npz): for data that moved, or a new test set")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--limit", type=int, default=0,
                   help="at most this many images per task, a fixed random sample (default 0: all)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also whether the routes carry the tasks: the distance between tasks' routes, each task "
                        "run with the other tasks' routes, and with its own route's steps shuffled")
    add_data_dir(p)
    add_device(p)
    p.set_defaults(func=cmd_eval)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="the classes a trained model gives image files")
    p.add_argument("--from", dest="from_", required=True, help="a checkpoint or run folder")
    p.add_argument("--task", help="the task whose classes to predict; default: the one --task-file adds")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="one task per IMAGE (a folder's images all take its "
                   "task): several tasks served in one batch")
    add_task_file(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, or folders of them")
    p.add_argument("--top", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON: file, then class, index and probability")
    add_device(p)
    p.set_defaults(func=cmd_predict)


def add_bench(sub) -> None:
    from isomod.bench import registry

    benches = registry()
    bench = sub.add_parser("bench", help=f"run a benchmark: {', '.join(benches)}").add_subparsers(
        dest="bench", required=True, metavar="{" + ",".join(benches) + "}")
    for name, b in benches.items():
        p = with_config(bench.add_parser(name, help=b.help), b.config(), b.unprefixed, data_dir=False, hidden=b.hidden)
        p.add_argument("--out", required=True, help="output folder for results.json, report.md, figures")
        p.add_argument("--force", action="store_true", help="start afresh in an --out folder whose results.json "
                       "holds a run of another configuration (the folder is emptied first)")
        p.set_defaults(func=cmd_bench)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="redraw report.md and figures from a run folder's results.json, or "
                       "a docs page's tables from a results file (docs/results/NAME.json)")
    p.add_argument("dir", metavar="PATH", nargs="?", help="a bench's output folder, or a results .json file; with "
                   "--claims, the folder of results files (default docs/results)")
    p.add_argument("--docs", help="also rewrite the generated tables of this docs/results/<bench>.md page")
    p.add_argument("--out", help="folder for report.md and the figures (default: PATH when it is a folder)")
    p.add_argument("--claims", action="store_true", help="evaluate every registered claim (isomod.bench.claims): "
                   "paired differences, a 95%% t-interval over units, and a verdict")
    p.add_argument("--names", nargs="+", metavar="CLAIM", help="with --claims: only these claims")
    p.add_argument("--json", action="store_true", help="with --claims: print JSON")
    p.add_argument("--readme", help="with --claims: rewrite this README's generated summary")
    p.set_defaults(func=cmd_report)


def add_tasks(sub) -> None:
    p = sub.add_parser("tasks", help="list suites and tasks")
    p.set_defaults(func=cmd_tasks)


COMMANDS = (add_demo, add_train, add_eval, add_predict, add_transfer, add_adapt, add_export, add_task, add_bench,
            add_report, add_tasks)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isomod", description="Compositional modular networks: "
                                     "a pool of residual modules, a learned route per task.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except Interrupted as exc:
        print(f"isomod: {exc}", file=sys.stderr)
        command = resume_command(argv)
        if exc.checkpoint is not None and command:
            print(f"isomod: continue with: {command}", file=sys.stderr)
        return 128 + exc.signum
    except IsomodError as exc:
        print(f"isomod: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full disk, a read-only or vanished folder: what was saved before stays as it was.
        print(f"isomod: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''} (files already "
              "written, the last good checkpoint among them, are kept)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("isomod: interrupted; the last checkpoint written stays on disk", file=sys.stderr)
        return 130


def resume_command(argv: list[str] | None) -> str | None:
    """The command line that continues an interrupted run (`train`: the same with `--resume`;
    a bench or the demo resume by themselves: the same), or None (a transfer or adaptation
    starts over)."""
    import shlex

    words = [w for w in (sys.argv[1:] if argv is None else argv) if w != "--force"]
    if not words or words[0] not in ("train", "bench", "demo"):
        return None
    if words[0] == "train" and "--resume" not in words:
        words.append("--resume")
    return shlex.join(["isomod", *words])


if __name__ == "__main__":
    sys.exit(main())
