"""The `isomod` command.

    isomod demo                      train on `glyphs` with the baselines, write runs/demo/
    isomod train --tasks glyphs --out runs/x [--config cfg.yaml] [--steps 500] [--resume]
                 (model options take a prefix: --model-channels 16 --model-steps 6)
    isomod eval --from runs/x/checkpoint
    isomod transfer --from runs/x/checkpoint --task uci-digits [--shots 10] --out runs/y
    isomod bench mtl --out runs/bench-mtl [--seeds 0 1]
    isomod report runs/bench-mtl     redraw figures and report.md from results.json
    isomod tasks                     list registered suites and tasks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from isomod.errors import IsomodError


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def docstring_args(cls) -> dict[str, str]:
    """Field descriptions from the `Args:` block of a class docstring."""
    out: dict[str, str] = {}
    names: list[str] = []
    lines = (cls.__doc__ or "").split("Args:", 1)[-1].splitlines()
    for line in lines[1:]:
        text = line.strip()
        head, sep, rest = text.partition(": ")
        if sep and all(n.strip().isidentifier() for n in head.split(",")):
            names = [n.strip() for n in head.split(",")]
            for n in names:
                out[n] = rest
        elif text and names:
            for n in names:
                out[n] += " " + text
    return out


def add_dataclass_args(parser: argparse.ArgumentParser, base, title: str, prefix: str = "") -> None:
    """One `--PREFIXfield-name` option per field of the dataclass instance `base`, whose
    values the help shows as defaults; the parsed value is None when not given."""
    cls = type(base)
    group = parser.add_argument_group(f"{title} options")
    docs = docstring_args(cls)
    for f in dataclasses.fields(cls):
        kind = {"int": int, "float": float, "bool": _bool, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        group.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{title}.{f.name}", type=kind, default=None,
                           metavar=kind.__name__.upper().lstrip("_"),
                           help=f"{docs.get(f.name, '')} (default {getattr(base, f.name)!r})".replace("%", "%%").strip())


def read_config_file(path: str | None) -> dict:
    """A YAML or JSON file with optional `model:` and `train:` sections."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise IsomodError(f"config file {path} not found")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:
        raise IsomodError(f"{path}: cannot parse config ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise IsomodError(f"{path}: a config holds only 'model:' and 'train:' sections")
    return data


def build_configs(args: argparse.Namespace, model_base, train_base):
    """Defaults <- config file <- command-line options."""
    from isomod.network import ModelConfig
    from isomod.train import TrainConfig

    file = read_config_file(getattr(args, "config", None))
    merged = {"model": {**dataclasses.asdict(model_base), **file.get("model", {})},
              "train": {**dataclasses.asdict(train_base), **file.get("train", {})}}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            merged[section][name] = value
    return ModelConfig.from_dict(merged["model"]), TrainConfig.from_dict(merged["train"])


def cmd_tasks(args) -> int:
    from isomod.data.tasks import SUITES, TASKS

    print("suites:")
    for name, tasks in SUITES.items():
        print(f"  {name}: {', '.join(tasks)}")
    print("tasks:", ", ".join(TASKS))
    print("or a path: a folder of class sub-folders of images, or an .npz with x_train, y_train, x_test, y_test")
    return 0


def cmd_train(args) -> int:
    from isomod.data.tasks import load_task, resolve
    from isomod.network import ModelConfig, ModularNet
    from isomod.train import TrainConfig, Trainer

    model_cfg, train_cfg = build_configs(args, ModelConfig(), TrainConfig())
    tasks = [load_task(n) for n in resolve(args.tasks)]
    channels = {t.spec.input_shape[0] for t in tasks}
    if len(channels) > 1:
        raise IsomodError(f"tasks mix {sorted(channels)}-channel inputs; one model takes one channel count")
    model_cfg = dataclasses.replace(model_cfg, in_channels=channels.pop())
    model = ModularNet(model_cfg, [t.spec for t in tasks])
    trainer = Trainer(model, tasks, train_cfg, out_dir=args.out, progress=not args.no_progress)
    accs = trainer.fit(resume=args.resume)
    for name in model.task_names:
        print(f"{model.route_str(name)}    test acc {accs[name]:.3f}")
    print(f"mean test acc {sum(accs.values()) / len(accs):.3f}; checkpoint: {trainer.checkpoint_path}")
    return 0


def cmd_eval(args) -> int:
    from isomod.checkpoint import load_checkpoint
    from isomod.data.tasks import load_task, resolve
    from isomod.train import evaluate

    model = load_checkpoint(args.from_)
    names = resolve(args.tasks) if args.tasks else model.task_names
    tasks = [load_task(model.check_task(n).source or n) for n in names]
    accs = evaluate(model, dict(zip(names, tasks)), split=args.split)
    for name, acc in accs.items():
        route = f"   route {model.route(name)}" if hasattr(model, "route") else ""
        print(f"{name}: {args.split} acc {acc:.4f}{route}")
    return 0


def cmd_transfer(args) -> int:
    from isomod.adapt import TRANSFER_TRAIN, few_shot, fit_route
    from isomod.checkpoint import load_checkpoint
    from isomod.data.tasks import load_task

    model = load_checkpoint(args.from_)
    _, train_cfg = build_configs(args, model.config, TRANSFER_TRAIN)
    task = few_shot(load_task(args.task), args.shots, seed=train_cfg.seed)
    before = model.param_count()
    accs = fit_route(model, task, train_cfg, out_dir=args.out, init_from=args.init_from,
                     progress=not args.no_progress)
    added = model.param_count() - before
    print(f"{model.route_str(task.name)}    test acc {accs[task.name]:.4f}")
    print(f"added {added:,} parameters ({100 * added / before:.2f}% of the {before:,} before); "
          f"checkpoint: {Path(args.out) / 'checkpoint'} (serves all {len(model.task_names)} tasks)")
    return 0


def print_table(results: dict) -> None:
    from isomod.report import markdown_results

    print(markdown_results(results["rows"]))


def cmd_bench(args) -> int:
    from isomod.bench import mtl

    if args.name != "mtl":
        raise IsomodError(f"unknown benchmark {args.name!r}; known: mtl")
    model_cfg, train_cfg = build_configs(args, mtl.DEFAULT_MODEL, mtl.DEFAULT_TRAIN)
    results = mtl.run(args.out, suite=args.suite, model_config=model_cfg, train_config=train_cfg,
                      seeds=args.seeds or mtl.DEFAULT_SEEDS, progress=not args.no_progress)
    print_table(results)
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    return 0


def cmd_demo(args) -> int:
    from isomod.bench import mtl
    from isomod.data.tasks import load_suite

    model_cfg, train_cfg = build_configs(args, mtl.DEFAULT_MODEL, mtl.DEFAULT_TRAIN)
    print("isomod demo: a modular network, independent networks and a shared trunk on the 'glyphs' suite")
    print("(8 scripts rendered from matplotlib's fonts; test images use font faces never seen in training)")
    tasks = load_suite("glyphs")
    for t in tasks:
        print(f"  {t.name}: {t.spec.num_classes} classes, {len(t.y_train)} train / {len(t.y_test)} test images")
    results = mtl.run(args.out, suite="glyphs", model_config=model_cfg, train_config=train_cfg, seeds=[0],
                      tasks=tasks, progress=not args.no_progress, bench="mtl")
    print()
    print_table(results)
    routes = results["routes"]["s0"]["discrete"]
    print("\nlearned routes (module per step):")
    for name, r in routes.items():
        print(f"  {name}: {' '.join(map(str, r))}")
    out = Path(args.out)
    print(f"\nreport: {out / 'report.md'}\ncheckpoint: {out / 'runs' / 'modular-s0' / 'checkpoint'}")
    return 0


def cmd_report(args) -> int:
    from isomod.bench import mtl

    file = Path(args.dir) / "results.json"
    if not file.is_file():
        raise IsomodError(f"{file} not found: run a benchmark with --out {args.dir} first")
    results = json.loads(file.read_text())
    print(f"wrote {mtl.write_report(Path(args.dir), results)}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    from isomod.adapt import TRANSFER_TRAIN
    from isomod.bench import mtl
    from isomod.network import ModelConfig
    from isomod.train import TrainConfig

    parser = argparse.ArgumentParser(prog="isomod", description="Compositional modular networks: "
                                     "a pool of residual modules, a learned route per task.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_configs(p, model=ModelConfig(), train=TrainConfig()):
        p.add_argument("--config", help="YAML or JSON file with 'model:' and 'train:' sections")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        add_dataclass_args(p, model, "model", prefix="model-")
        add_dataclass_args(p, train, "train")
        return p

    p = with_configs(sub.add_parser("demo", help="the main job: modular vs baselines on glyphs, with a report"),
                     mtl.DEFAULT_MODEL, mtl.DEFAULT_TRAIN)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = with_configs(sub.add_parser("train", help="train a modular network on tasks or suites"))
    p.add_argument("--tasks", nargs="+", required=True, help="task or suite names, or paths to folders / .npz")
    p.add_argument("--out", required=True, help="run folder: checkpoint/, log.jsonl, train_config.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("transfer", help="add a task to a trained model, learning only its route, norms and head")
    p.add_argument("--config", help="YAML or JSON file with a 'train:' section")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_dataclass_args(p, TRANSFER_TRAIN, "train")
    p.add_argument("--from", dest="from_", required=True, help="checkpoint folder of a trained ModularNet")
    p.add_argument("--task", required=True, help="the new task: a registered name, a folder or an .npz")
    p.add_argument("--shots", type=int, help="training images per class (default: all)")
    p.add_argument("--init-from", help="an existing task whose step norms the new task starts from")
    p.add_argument("--out", required=True, help="run folder for the new checkpoint and log")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("eval", help="accuracy of a checkpoint on its tasks")
    p.add_argument("--from", dest="from_", required=True, help="checkpoint folder")
    p.add_argument("--tasks", nargs="*", help="tasks to evaluate (default: all of the checkpoint's)")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.set_defaults(func=cmd_eval)

    p = with_configs(sub.add_parser("bench", help="run a benchmark: mtl"), mtl.DEFAULT_MODEL, mtl.DEFAULT_TRAIN)
    p.add_argument("name", help="benchmark name: mtl")
    p.add_argument("--out", required=True, help="output folder for results.json, report.md, figures")
    p.add_argument("--suite", default="glyphs")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="redraw figures and report.md from DIR/results.json")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tasks", help="list suites and tasks")
    p.set_defaults(func=cmd_tasks)
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
