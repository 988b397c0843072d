"""The `isomod` command.

    isomod demo                      train on `glyphs` with the baselines, write runs/demo/
    isomod train --tasks glyphs --out runs/x [--config cfg.yaml] [--steps 500] [--resume] [--image-size 224]
                 (model options take a prefix: --model-channels 16 --model-steps 6)
    isomod eval --from runs/x/checkpoint
    isomod export --from runs/x/checkpoint --task glyphs/greek --format torchscript|onnx --out greek.pt
    isomod transfer --from runs/x/checkpoint --task uci-digits [--shots 10] --out runs/y
    isomod adapt --from runs/x/checkpoint --target digits5/mnistm --out runs/z [--method route_select]
    isomod bench mtl --out runs/bench-mtl [--seeds 0 1]
    isomod bench transfer --out runs/bench-transfer [--shots 10 100 all]
    isomod bench continual --out runs/bench-continual [--grow-threshold 0.9]
    isomod bench adapt --out runs/bench-adapt [--targets digits5/mnistm] [--seeds 0 1]
    isomod bench reuse --out runs/bench-reuse [--task glyphs/all] [--modules 4 8] [--multiples 1 2 3]
    isomod bench speed --out runs/bench-speed [--modules 4 8 16] [--tasks 1 8] [--speed-device cuda]
    torchrun --nproc_per_node=P -m isomod train|bench reuse ...   data-parallel over P processes
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


def _shots(text: str) -> int | None:
    if text == "all":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive number of images per class or 'all', got {text!r}")


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


def read_config_file(path: str | None, sections: list[str]) -> dict:
    """A YAML or JSON file whose top-level keys are some of `sections` (e.g. `model:`, `train:`)."""
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
    if not isinstance(data, dict) or set(data) - set(sections):
        raise IsomodError(f"{path}: this command's config holds only {', '.join(repr(s + ':') for s in sections)} sections")
    return data


def build_configs(args: argparse.Namespace, **bases) -> dict:
    """One dataclass per section, e.g. `model=ModelConfig()`: defaults <- config file <- options."""
    from isomod.errors import dataclass_from_dict

    file = read_config_file(getattr(args, "config", None), list(bases))
    merged = {name: {**dataclasses.asdict(base), **(file.get(name) or {})} for name, base in bases.items()}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            merged[section][name] = value
    return {name: dataclass_from_dict(type(base), merged[name], f"{name} config") for name, base in bases.items()}


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
    from isomod.network import ModelConfig, ModularNet
    from isomod.train import TrainConfig, Trainer

    cfg = build_configs(args, model=ModelConfig(), train=TrainConfig())
    model_cfg, train_cfg = cfg["model"], cfg["train"]
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

    model = load_checkpoint(args.from_)
    names = resolve(args.tasks) if args.tasks else model.task_names
    tasks = [load_task(model.check_task(n).source or n, data_dir=args.data_dir) for n in names]
    accs = evaluate(model, dict(zip(names, tasks)), split=args.split)
    for name, acc in accs.items():
        route = f"   route {model.route(name)}" if hasattr(model, "route") else ""
        print(f"{name}: {args.split} acc {acc:.4f}{route}")
    return 0


def cmd_transfer(args) -> int:
    from isomod.transfer import TRANSFER_TRAIN, few_shot, transfer
    from isomod.checkpoint import load_checkpoint
    from isomod.data.tasks import load_task
    from isomod.network import ModularNet

    model = load_checkpoint(args.from_)
    if not isinstance(model, ModularNet):
        raise IsomodError(f"{args.from_}: transfer needs a ModularNet checkpoint, this one holds a {type(model).__name__}")
    if args.source is not None:
        model.check_task(args.source)
    train_cfg = build_configs(args, train=TRANSFER_TRAIN)["train"]
    task = load_task(args.task, data_dir=args.data_dir)
    model.check_spec(task.spec, model.config.in_channels)
    task = few_shot(task, args.shots, seed=train_cfg.seed)
    before = model.param_count()
    result = transfer(model, task, args.method, train_cfg, source=args.source, out_dir=args.out,
                      progress=not args.no_progress)
    out = Path(args.out) / "checkpoint"
    print(f"{task.name}: test acc {result.test_acc:.4f}    route {result.model.route(task.name)}    "
          f"(started from task {result.source})")
    print(f"added {result.params_task:,} parameters ({100 * result.params_task / before:.2f}% of the {before:,} before); "
          f"checkpoint: {out} (holds {len(result.model.task_names)} task(s))")
    return 0


def cmd_adapt(args) -> int:
    from isomod.checkpoint import load_checkpoint, save_checkpoint
    from isomod.data.tasks import load_task
    from isomod.network import ModularNet
    from isomod.train import evaluate
    from isomod.adapt import ADAPT_TRAIN, adapt

    model = load_checkpoint(args.from_)
    if not isinstance(model, ModularNet):
        raise IsomodError(f"{args.from_}: adaptation needs a ModularNet checkpoint, this one holds a {type(model).__name__}")
    train_cfg = build_configs(args, train=ADAPT_TRAIN)["train"]
    target = load_task(args.target, data_dir=args.data_dir)
    res = adapt(model, target, args.method, train_cfg, out_dir=args.out, progress=not args.no_progress)
    out = save_checkpoint(model, Path(args.out) / "checkpoint", extra={"adapted": target.name, "method": args.method})
    acc = evaluate(model, {target.name: target})[target.name]  # the target's labels are read here, and only here
    scores = ", ".join(f"{n} {v:.3f}" for n, v in res.scores.items())
    print(f"{target.name}: {args.method} started from {res.source} (by {res.score}, lower is better: {scores})")
    print(f"route {model.route(target.name)}    test acc {acc:.4f} (labels used for this line only)")
    if res.kept is not None:
        print("the learned route scored better than its start and was kept" if res.kept else
              f"the learned route scored worse than its start ({res.source}'s route), which was restored")
    print(f"the target changed {res.params_task:,} numbers; pool, stem, head and sources are unchanged; "
          f"checkpoint: {out}")
    return 0


def cmd_export(args) -> int:
    import torch

    from isomod.checkpoint import load_checkpoint
    from isomod.export import example_input, export_task, save_onnx, save_torchscript

    model = load_checkpoint(args.from_).eval()
    model.check_task(args.task)
    net = export_task(model, args.task)
    x = example_input(model, args.task, batch=8)
    with torch.no_grad():
        diff = (net(x) - model(x, args.task)).abs().max().item()
    out = save_torchscript(net, args.out) if args.format == "torchscript" else save_onnx(net, args.out, x[:2])
    stored = len(list(net.parameters()))  # parameters() yields a shared tensor once
    print(f"{args.task}: route {' '.join(map(str, net.route))}; {stored} weight tensors, "
          f"{sum(p.numel() for p in net.parameters()):,} parameters ({len(set(net.route))} distinct modules "
          f"for {len(net.route)} steps)")
    print(f"max abs difference from the model on 8 random inputs: {diff:.2e}; wrote {out} ({args.format})")
    return 0


def print_table(results: dict) -> None:
    from isomod.report import markdown_results

    print(markdown_results(results["rows"]))


def cmd_bench_mtl(args) -> int:
    from isomod.bench import mtl

    cfg = build_configs(args, model=mtl.DEFAULT_MODEL, train=mtl.DEFAULT_TRAIN)
    results = mtl.run(args.out, suite=args.suite, model_config=cfg["model"], train_config=cfg["train"],
                      seeds=args.seeds or mtl.DEFAULT_SEEDS, progress=not args.no_progress)
    print_table(results)
    return wrote(args.out)


def cmd_bench_transfer(args) -> int:
    from isomod.bench import transfer

    cfg = build_configs(args, model=transfer.DEFAULT_MODEL, pretrain=transfer.DEFAULT_PRETRAIN,
                        train=transfer.DEFAULT_TRANSFER)
    results = transfer.run(args.out, pretrain_tasks=args.pretrain_tasks or transfer.PRETRAIN,
                           held_out=args.held_out or transfer.HELD_OUT, shots=args.shots or transfer.SHOTS,
                           methods=args.methods or transfer.TRANSFER_METHODS, model_config=cfg["model"],
                           pretrain_config=cfg["pretrain"], transfer_config=cfg["train"], seeds=args.seeds or [0],
                           data_dir=args.data_dir, progress=not args.no_progress)
    print(transfer.markdown_table(results))
    return wrote(args.out)


def cmd_bench_continual(args) -> int:
    from isomod.bench import continual

    cfg = build_configs(args, model=continual.DEFAULT_MODEL, train=continual.DEFAULT_TRAIN, grow=continual.DEFAULT_GROW)
    results = continual.run(args.out, stream=args.stream or continual.STREAM, methods=args.methods or continual.METHODS,
                            model_config=cfg["model"], train_config=cfg["train"], grow=cfg["grow"],
                            data_dir=args.data_dir, progress=not args.no_progress)
    print(continual.final_table(results))
    return wrote(args.out)


def cmd_bench_adapt(args) -> int:
    from isomod.bench import adapt

    cfg = build_configs(args, model=adapt.DEFAULT_MODEL, source=adapt.DEFAULT_SOURCE, train=adapt.DEFAULT_ADAPT)
    results = adapt.run(args.out, targets=args.targets or adapt.DOMAINS, methods=args.methods or adapt.ADAPT_METHODS,
                        model_config=cfg["model"], source_config=cfg["source"], adapt_config=cfg["train"],
                        seeds=args.seeds or adapt.SEEDS, progress=not args.no_progress)
    print_table(results)
    print("\n".join(adapt.checks(results)))
    return wrote(args.out)


def cmd_bench_reuse(args) -> int:
    from isomod import distributed
    from isomod.bench import reuse

    cfg = build_configs(args, model=reuse.DEFAULT_MODEL, train=reuse.DEFAULT_TRAIN)
    results = reuse.run(args.out, task=args.task, data_dir=args.data_dir, image_size=args.image_size,
                        modules=args.modules or reuse.MODULES, multiples=args.multiples or reuse.MULTIPLES,
                        methods=args.methods or reuse.REUSE_METHODS, model_config=cfg["model"],
                        train_config=cfg["train"], seeds=args.seeds or reuse.SEEDS, progress=not args.no_progress)
    if not distributed.is_main():
        return 0
    print(reuse.markdown_table(results))
    print("\n".join(reuse.checks(results)))
    return wrote(args.out)


def cmd_bench_speed(args) -> int:
    from isomod.bench import speed

    cfg = build_configs(args, model=speed.DEFAULT_MODEL, speed=speed.SpeedConfig())
    results = speed.run(args.out, modules=args.modules or speed.MODULES, tasks=args.tasks or speed.TASKS,
                        model_config=cfg["model"], speed=cfg["speed"], progress=not args.no_progress)
    print(speed.markdown_table(results))
    print("\n".join(speed.checks(results)))
    return wrote(args.out)


def wrote(out: str) -> int:
    print(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'report.md'}")
    return 0


def cmd_demo(args) -> int:
    from isomod.bench import mtl
    from isomod.data.tasks import load_suite

    cfg = build_configs(args, model=mtl.DEFAULT_MODEL, train=mtl.DEFAULT_TRAIN)
    model_cfg, train_cfg = cfg["model"], cfg["train"]
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
    from isomod.bench import adapt, continual, mtl, reuse, speed, transfer

    file = Path(args.dir) / "results.json"
    if not file.is_file():
        raise IsomodError(f"{file} not found: run a benchmark with --out {args.dir} first")
    results = json.loads(file.read_text())
    writers = {"mtl": mtl.write_report, "transfer": transfer.write_report, "continual": continual.write_report,
               "adapt": adapt.write_report, "reuse": reuse.write_report, "speed": speed.write_report}
    if results.get("bench") not in writers:
        raise IsomodError(f"{file}: unknown benchmark {results.get('bench')!r}; known: {', '.join(writers)}")
    print(f"wrote {writers[results['bench']](Path(args.dir), results)}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    from isomod.transfer import TRANSFER_METHODS, TRANSFER_TRAIN
    from isomod.bench import adapt, continual, mtl, reuse, speed, transfer
    from isomod.export import EXPORT_FORMATS
    from isomod.network import ModelConfig
    from isomod.adapt import ADAPT_METHODS, ADAPT_TRAIN
    from isomod.train import TrainConfig

    parser = argparse.ArgumentParser(prog="isomod", description="Compositional modular networks: "
                                     "a pool of residual modules, a learned route per task.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_configs(p, **bases):
        p.add_argument("--config", help=f"YAML or JSON file with {', '.join(repr(s + ':') for s in bases)} sections")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--data-dir", help="where to look first for data that is not embedded (Fashion-MNIST's IDX "
                       "files); then $ISOMOD_DATA, then /usr/share/datasets")
        for name, base in bases.items():
            add_dataclass_args(p, base, name, prefix="" if name == "train" else f"{name}-")
        return p

    p = with_configs(sub.add_parser("demo", help="the main job: modular vs baselines on glyphs, with a report"),
                     model=mtl.DEFAULT_MODEL, train=mtl.DEFAULT_TRAIN)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = with_configs(sub.add_parser("train", help="train a modular network on tasks or suites"),
                     model=ModelConfig(), train=TrainConfig())
    p.add_argument("--tasks", nargs="+", required=True, help="task or suite names, or paths to folders / .npz")
    p.add_argument("--out", required=True, help="run folder: checkpoint/, log.jsonl, train_config.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--image-size", type=int, help="side a folder's images are resized to (default 28)")
    p.set_defaults(func=cmd_train)

    p = with_configs(sub.add_parser("transfer", help="add a task to a trained model, learning only its route, "
                                    "norms and head"), train=TRANSFER_TRAIN)
    p.add_argument("--from", dest="from_", required=True, help="checkpoint folder of a trained ModularNet")
    p.add_argument("--task", required=True, help="the new task: a registered name, a folder or an .npz")
    p.add_argument("--shots", type=int, help="training images per class (default: all)")
    p.add_argument("--source", "--init-from", dest="source",
                   help="the checkpoint's task to start from (its norms; its route for the baselines); "
                        "default: the one whose features separate the new classes best")
    p.add_argument("--method", default="route_only", choices=TRANSFER_METHODS,
                   help="route_only (default) leaves every earlier task unchanged; the others are the baselines "
                        "of `bench transfer` (finetune changes the shared pool, scratch keeps only the new task)")
    p.add_argument("--out", required=True, help="run folder for the new checkpoint and log")
    p.set_defaults(func=cmd_transfer)

    p = with_configs(sub.add_parser("adapt", help="add an unlabelled target domain to a multi-source model by "
                                    "re-ordering its modules (pool, stem and head unchanged)"), train=ADAPT_TRAIN)
    p.add_argument("--from", dest="from_", required=True, help="checkpoint of a ModularNet trained on source domains")
    p.add_argument("--target", required=True, help="the new domain, e.g. digits5/mnistm; its labels are read only to "
                   "report the final test accuracy")
    p.add_argument("--method", default="route_select", choices=ADAPT_METHODS,
                   help="route_select (default), route_im and route_entropy change the route and norm statistics; "
                        "source_only, adabn and tent are the baselines of `bench adapt` (where tent scored best)")
    p.add_argument("--out", required=True, help="run folder for the new checkpoint and log")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("export", help="a task with a discrete route as a standalone TorchScript or ONNX network")
    p.add_argument("--from", dest="from_", required=True, help="checkpoint folder of a ModularNet")
    p.add_argument("--task", required=True, help="the task to export; its route must be discrete")
    p.add_argument("--format", default="torchscript", choices=EXPORT_FORMATS,
                   help="torchscript (torch.jit.load, no isomod needed) or onnx (onnxruntime; needs the onnx and "
                        "onnxscript packages)")
    p.add_argument("--out", required=True, help="file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="accuracy of a checkpoint on its tasks")
    p.add_argument("--from", dest="from_", required=True, help="checkpoint folder")
    p.add_argument("--tasks", nargs="*", help="tasks to evaluate (default: all of the checkpoint's)")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--data-dir", help="where to look first for data that is not embedded (Fashion-MNIST)")
    p.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="run a benchmark: mtl, transfer, continual, adapt, reuse, speed").add_subparsers(
        dest="bench", required=True, metavar="{mtl,transfer,continual,adapt,reuse,speed}")
    p = with_configs(bench.add_parser("mtl", help="modular vs independent networks vs a shared trunk"),
                     model=mtl.DEFAULT_MODEL, train=mtl.DEFAULT_TRAIN)
    p.add_argument("--suite", default="glyphs")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1")
    p.set_defaults(func=cmd_bench_mtl)
    p = with_configs(bench.add_parser("transfer", help="route-only transfer vs head-only, norms+head, fine-tuning "
                                      "and scratch on held-out tasks"),
                     model=transfer.DEFAULT_MODEL, pretrain=transfer.DEFAULT_PRETRAIN, train=transfer.DEFAULT_TRANSFER)
    p.add_argument("--pretrain-tasks", nargs="+", help=f"default {' '.join(transfer.PRETRAIN)}")
    p.add_argument("--held-out", nargs="+", help=f"default {' '.join(transfer.HELD_OUT)}")
    p.add_argument("--shots", nargs="+", type=_shots, help="images per class, integers or 'all' (default 10 100 all)")
    p.add_argument("--methods", nargs="+", choices=TRANSFER_METHODS, help="default: all")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0")
    p.set_defaults(func=cmd_bench_transfer)
    p = with_configs(bench.add_parser("continual", help="a stream of tasks: growing pool vs independent networks vs "
                                      "sequential fine-tuning"),
                     model=continual.DEFAULT_MODEL, train=continual.DEFAULT_TRAIN, grow=continual.DEFAULT_GROW)
    p.add_argument("--stream", nargs="+", help=f"task names in order (default {' '.join(continual.STREAM)})")
    p.add_argument("--methods", nargs="+", choices=continual.METHODS, help="default: all")
    p.set_defaults(func=cmd_bench_continual)
    p = with_configs(bench.add_parser("adapt", help="unsupervised multi-source domain adaptation on digits5, leave "
                                      "one domain out: route methods vs source-only, AdaBN and TENT"),
                     model=adapt.DEFAULT_MODEL, source=adapt.DEFAULT_SOURCE, train=adapt.DEFAULT_ADAPT)
    p.add_argument("--targets", nargs="+", choices=adapt.DOMAINS, help="default: all five domains")
    p.add_argument("--methods", nargs="+", choices=ADAPT_METHODS, help="default: all")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1")
    p.set_defaults(func=cmd_bench_adapt)
    p = with_configs(bench.add_parser("reuse", help="block reuse for one task: N modules run over L = N, 2N, 3N "
                                      "steps (cyclic, block-repeat, learned) vs L distinct modules"),
                     model=reuse.DEFAULT_MODEL, train=reuse.DEFAULT_TRAIN)
    p.add_argument("--task", default="fashion-mnist", help="a registered task (default fashion-mnist; glyphs/all is "
                   "the harder 216-class one), a folder of class sub-folders of images, or an .npz")
    p.add_argument("--image-size", type=int, help="side a folder's images are resized to (default 28)")
    p.add_argument("--modules", type=int, nargs="+", help="pool sizes N (default 4 8)")
    p.add_argument("--multiples", type=int, nargs="+", help="route lengths L as multiples of N (default 1 2 3)")
    p.add_argument("--methods", nargs="+", choices=reuse.REUSE_METHODS, help="default: all")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1")
    p.set_defaults(func=cmd_bench_reuse)
    p = with_configs(bench.add_parser("speed", help="training and inference speed and memory of routes against a "
                                      "plain isometric ResNet"), model=speed.DEFAULT_MODEL, speed=speed.SpeedConfig())
    p.add_argument("--modules", type=int, nargs="+", help="pool sizes N (default 4 8 16)")
    p.add_argument("--tasks", type=int, nargs="+", help="tasks per training step (default 1 8)")
    p.set_defaults(func=cmd_bench_speed)
    for p in bench.choices.values():
        p.add_argument("--out", required=True, help="output folder for results.json, report.md, figures")

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
