"""The `isomod` commands that train, use or change a model: train, eval, transfer, adapt,
export and predict. Each command's options come from its config dataclass (`TrainRun`,
`TransferRun`, `AdaptRun`) or its parser builder below; `isomod.cli` gathers them.

A checkpoint is named by its folder or by the run folder holding it; every recorded input
shape is honoured (a task's data is read at the size it was trained at, and a mismatch is a
one-line error, never a silent resize).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from isomod.methods.adapt import ADAPT, ADAPT_TRAIN
from isomod.cli.options import build_config, positive
from isomod.errors import IsomodError, check_out_dir, check_out_file
from isomod.core.network import ModelConfig
from isomod.training.regimes import DEFAULT_REGIME, REGIMES, regime
from isomod.methods.search import SearchConfig
from isomod.training.trainer import TrainConfig
from isomod.methods.transfer import TRANSFER, TRANSFER_TRAIN
from isomod import seeds

ONE_TASK = ("train.tasks_per_step", "train.sampling")  # options that mean nothing when one task trains


@dataclasses.dataclass
class TrainRun:
    """`isomod train`.

    Args:
        model: the modular network's shape (the default regime's pool and route start,
            unless `--regime` names another).
        train: the training budget and schedule.
    """

    model: ModelConfig = dataclasses.field(default_factory=lambda: REGIMES[DEFAULT_REGIME].apply(
        ModelConfig(), TrainConfig())[0])
    train: TrainConfig = dataclasses.field(default_factory=lambda: REGIMES[DEFAULT_REGIME].apply(
        ModelConfig(), TrainConfig())[1])


@dataclasses.dataclass
class TransferRun:
    """`isomod transfer`.

    Args:
        train: the new task's training budget.
        search: how `--method route_search` searches (isomod.methods.search); its seed is the run's.
    """

    train: TrainConfig = dataclasses.field(default_factory=lambda: TRANSFER_TRAIN)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)


@dataclasses.dataclass
class AdaptRun:
    """`isomod adapt`.

    Args:
        train: the budget of the methods that train.
        search: how the few-label `route_search` searches (isomod.methods.search).
    """

    train: TrainConfig = dataclasses.field(default_factory=lambda: ADAPT_TRAIN)
    search: SearchConfig = dataclasses.field(default_factory=lambda: SearchConfig(proxy="head"))


def checkpoint_folder(path: str) -> Path:
    """A checkpoint folder, the run folder that holds one (`RUN/checkpoint`), or a pool the
    package ships (`pretrained:NAME`)."""
    from isomod.io.checkpoint import resolve

    folder = resolve(path)
    if not (folder / "config.json").is_file() and (folder / "checkpoint" / "config.json").is_file():
        return folder / "checkpoint"
    return folder


def load_model(path: str, device: str = "cpu", task_files: list[str] | None = None):
    """The checkpoint at `path` (a run folder or checkpoint), with the task files added."""
    from isomod.io.checkpoint import load_checkpoint
    from isomod.training.trainer import resolve_device

    model = load_checkpoint(checkpoint_folder(path), device=resolve_device(device))
    for folder in task_files or []:
        model.require_routes(f"{path}: --task-file")
        model.load_task(folder)
    return model


def only_task(args, model) -> str:
    """`--task`, or the one task a single `--task-file` added."""
    if args.task:
        return args.task
    if len(args.task_file or []) == 1:
        return model.task_names[-1]
    raise IsomodError("name the task with --task (or give one --task-file)")


def input_shape_of(model) -> tuple[int, int, int] | None:
    """The input shape every task of `model` records, or None when they differ."""
    shapes = {tuple(s.input_shape) for s in model.specs.values()}
    return shapes.pop() if len(shapes) == 1 else None


def summarize(task) -> str:
    source = task.spec.source if task.spec.source and task.spec.source != task.name else "registered"
    return (f"  {task.name}: {task.spec.num_classes} classes, {len(task.y_train):,} train / {len(task.y_test):,} test "
            f"images of {'x'.join(map(str, task.spec.input_shape))} ({source})")


def cmd_train(args) -> int:
    import torch

    from isomod.data.tasks import load_task, resolve
    from isomod.core.network import ModularNet
    from isomod.training.trainer import Trainer

    name = args.regime or DEFAULT_REGIME
    cfg = build_config(args, TrainRun(*regime(name).apply(ModelConfig(), TrainConfig())))
    check_out_dir(Path(args.out))
    tasks = [load_task(n, data_dir=args.data_dir, image_size=args.image_size, label_space=args.label_space)
             for n in resolve(args.tasks)]
    channels = {t.spec.input_shape[0] for t in tasks}
    if len(channels) > 1:
        raise IsomodError(f"tasks mix {sorted(channels)}-channel inputs; one model takes one channel count")
    model_cfg = dataclasses.replace(cfg.model, in_channels=channels.pop())
    print(f"read {len(tasks)} task{'s' if len(tasks) > 1 else ''}:", *map(summarize, tasks), sep="\n")
    seeds.seed(cfg.train.seed)  # the seed fixes the initial weights too, not only the batches
    model = ModularNet(model_cfg, [t.spec for t in tasks])
    record = {"regime": name, "image_size": args.image_size, "model": dataclasses.asdict(model_cfg),
              "tasks": [dataclasses.asdict(t.spec) for t in tasks], "command": ["isomod", *args.argv]}
    print(f"{model.param_count():,} parameters: {len(model.pool)} modules over {model_cfg.steps} steps "
          f"({name} regime), width {model_cfg.channels}; {cfg.train.steps:,} steps of {cfg.train.batch_size} images")
    trainer = Trainer(model, tasks, cfg.train, out_dir=args.out, progress=not args.no_progress, record=record)
    accs = trainer.fit(resume=args.resume, force=args.force, extend=args.extend)
    if not trainer.main:
        return 0
    for task in model.task_names:
        print(f"{model.route_str(task)}    test acc {accs[task]:.3f}")
    print(f"mean test acc {sum(accs.values()) / len(accs):.3f}; checkpoint: {trainer.checkpoint_path}")
    return 0


def cmd_eval(args) -> int:
    from isomod.data.tasks import load_recorded, resolve
    from isomod.training.trainer import evaluate

    if args.limit < 0:
        raise IsomodError(f"--limit must be >= 0 (0: every image), got {args.limit}")
    model = load_model(args.from_, args.device, args.task_file)
    added = model.task_names[len(model.task_names) - len(args.task_file or []):]
    names = resolve(args.tasks) if args.tasks else (added or model.task_names)
    if args.data and len(names) != 1:
        raise IsomodError(f"--data gives one task's images; name that task with --tasks (this model has "
                          f"{', '.join(model.task_names)})")
    tasks = {n: evaluation_images(load_recorded(model.check_task(n), args.data_dir, args.data), args.split,
                                  args.limit) for n in names}
    accs = evaluate(model, tasks)
    for name, acc in accs.items():
        print(f"{name}: {args.split} acc {acc:.4f}" + (f"   route {model.route(name)}" if model.has_routes else ""))
    if args.diagnostics and not model.has_routes:
        print(f"route diagnostics skipped: the tasks of a {type(model).__name__} own no routes")
    elif args.diagnostics:
        from isomod.methods import diagnostics

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


def new_task(args, model, name: str):
    """A new task or domain for `model`, read at the size its tasks record (a folder is
    resized to it, or to `--image-size`); a shape the model was not trained at is refused."""
    from isomod.data.tasks import load_task

    shape = input_shape_of(model)
    size = args.image_size or (shape[-1] if shape else None)
    task = load_task(name, data_dir=args.data_dir, image_size=size, label_space=args.label_space)
    recorded = {tuple(s.input_shape) for s in model.specs.values()}
    if tuple(task.spec.input_shape) not in recorded:
        want = " or ".join("x".join(map(str, s)) for s in sorted(recorded))
        raise IsomodError(f"{name} holds {'x'.join(map(str, task.spec.input_shape))} images; this model's tasks "
                          f"take {want} (channels x height x width); a folder is resized with --image-size")
    return task


def cmd_transfer(args) -> int:
    from isomod.training.runs import RunLock
    from isomod.methods.transfer import few_shot, transfer

    run = build_config(args, TransferRun())
    check_out_dir(Path(args.out))
    model = load_model(args.from_)
    model.require_routes(f"{args.from_}: transfer")
    if args.source is not None:
        model.check_task(args.source)
    task = new_task(args, model, args.task)
    model.check_spec(task.spec, model.config.in_channels)
    task = few_shot(task, args.shots, seed=run.train.seed)
    print(summarize(task))
    before = model.param_count()
    options = {"search": dataclasses.replace(run.search, seed=run.train.seed)} \
        if TRANSFER[args.method].searches else {}
    with RunLock(args.out):
        guard_folder(args)
        result = transfer(model, task, args.method, run.train, source=args.source, out_dir=args.out,
                          progress=not args.no_progress, **options)
    out = Path(args.out) / "checkpoint"
    print(f"{task.name}: test acc {result.test_acc:.4f}    route {result.model.route(task.name)}    "
          f"(started from task {result.source})")
    if "candidates" in result.info:
        i = result.info
        print(f"route search ({i['strategy']}, {i['proxy']} proxy): {i['candidates']} routes scored in "
              f"{i['search_seconds']:.1f} s; proxy {i['proxy_start']:.3f} at the start, {i['proxy_found']:.3f} found")
    print(f"added {result.params_task:,} numbers ({100 * result.params_task / before:.2f}% of the {before:,} "
          f"parameters before); checkpoint: {out} (holds {len(result.model.task_names)} task(s))")
    print(task_file_line(result.model, task.name, Path(args.out), args.from_, TRANSFER[args.method].whole_network))
    return 0


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def task_file_line(model, task: str, out: Path, base: str, changed_pool: bool) -> str:
    """Write the task's file beside the run's checkpoint (unless the method changed the pool,
    when only the checkpoint serves it) and say how large each is."""
    if changed_pool:
        return "no task file: this method changed the pool, so the task lives in the checkpoint alone"
    folder = model.save_task(task, out / "task", base=str(base))
    small, whole = folder_bytes(folder), folder_bytes(out / "checkpoint")
    return (f"task file: {folder} ({small / 1e3:,.1f} kB, {100 * small / whole:.2f}% of the checkpoint's "
            f"{whole / 1e6:,.2f} MB); it loads onto {base} or any copy of its pool (--task-file)")


def guard_folder(args) -> None:
    """A transfer or adaptation writes a run folder of its own: refuse one holding another run
    (the trainer inside checks again, under the same lock)."""
    from isomod.training.runs import check_start

    check_start(Path(args.out), resume=False, force=args.force)


def cmd_adapt(args) -> int:
    from isomod.methods.adapt import adapt, check_target
    from isomod.io.checkpoint import save_checkpoint
    from isomod.data.tasks import load_recorded
    from isomod.training.runs import RunLock
    from isomod.training.trainer import evaluate
    from isomod.methods.transfer import few_shot

    run = build_config(args, AdaptRun())
    check_out_dir(Path(args.out))
    model = load_model(args.from_)
    model.require_routes(f"{args.from_}: domain adaptation")
    target = new_task(args, model, args.target)
    unit = ADAPT[args.method]
    names = check_target(model, target.spec, len(target.x_train))
    print(summarize(target))
    kwargs = {}
    if unit.setting == "with_sources":  # the model's domains of the target's label space, by name
        kwargs["source_data"] = {n: load_recorded(model.specs[n], args.data_dir) for n in names}
        kwargs.update({"sources_train": True} if args.sources_train else {})
    if unit.setting == "few_labels":
        if args.shots is None:
            raise IsomodError(f"method {args.method!r} learns from a few labelled target images: give --shots K "
                              "(K labelled training images per class are read)")
        kwargs["labelled"] = few_shot(target, args.shots, seed=run.train.seed)
        kwargs["search"] = dataclasses.replace(run.search, seed=run.train.seed)
        print(f"read the labels of {args.shots} training images per class of {target.name}")
    with RunLock(args.out):
        guard_folder(args)
        res = adapt(model, target, args.method, run.train, out_dir=args.out, progress=not args.no_progress, **kwargs)
        out = save_checkpoint(model, Path(args.out) / "checkpoint", extra={"adapted": target.name,
                                                                          "method": args.method})
    acc = evaluate(model, {target.name: target})[target.name]  # the target's test labels are read here, and only here
    report_adaptation(args, model, target, res, acc, out)
    unit = ADAPT[args.method]
    print(task_file_line(model, target.name, Path(args.out), args.from_,
                         unit.whole_network or bool(res.info.get("sources_train"))))
    return 0


def report_adaptation(args, model, target, res, acc: float, out: Path) -> None:
    unit = ADAPT[args.method]
    scores = ", ".join(f"{n} {v:.3f}" for n, v in list(res.scores.items())[:8])
    print(f"{target.name}: {args.method} started from {res.source} (by {res.score}: {scores})")
    print(f"route {model.route(target.name)}    test acc {acc:.4f} (the test labels are read for this line only)")
    if res.kept is not None:
        print("the learned route scored better than its start and was kept" if res.kept else
              f"the learned route scored worse than its start ({res.source}'s route), which was restored")
    if unit.setting == "with_sources" and (not unit.learns_route or res.info.get("sources_train")):
        print(f"the adaptation changed {res.params_task:,} numbers (the network trained on the sources' labels too); "
              f"checkpoint: {out}")
    elif unit.owns_head:
        print(f"the target changed {res.params_task:,} numbers (it has its own head now); checkpoint: {out}")
    else:
        print(f"the target changed {res.params_task:,} numbers; pool, stem, head and sources are unchanged; "
              f"checkpoint: {out}")


def cmd_export(args) -> int:
    import torch

    from isomod.io.export import example_input, export_task, metadata, save_onnx, save_torchscript

    check_out_file(Path(args.out))
    model = load_model(args.from_, args.device, args.task_file).eval()
    if args.tasks:
        return export_several(args, model)
    args.task = only_task(args, model)
    model.check_task(args.task)
    net = export_task(model, args.task)
    meta = metadata(model, args.task, net)
    x = example_input(model, args.task, batch=8)
    with torch.no_grad():
        diff = (net(x) - model(x, args.task)).abs().max().item()
    net, x = net.cpu(), x.cpu()  # the file is read on any machine: CPU weights, whatever ran the check
    out = save_torchscript(net, args.out, meta) if args.format == "torchscript" else save_onnx(net, args.out, x[:2], meta)
    stored = len(list(net.parameters()))  # parameters() yields a shared tensor once
    what = (f"a soft route, each of the {len(net.route)} steps stored as its own mixture of modules" if net.soft
            else f"{len(set(net.route))} distinct modules for {len(net.route)} steps")
    print(f"{args.task}: route {' '.join(map(str, net.route))}{' (argmax of soft)' if net.soft else ''}; "
          f"{stored} weight tensors, {sum(p.numel() for p in net.parameters()):,} parameters ({what})")
    names = meta["class_names"]
    print(f"input: float32 (batch, {', '.join(map(str, meta['input_shape']))}), values in [0, 1] (pixels / 255); "
          f"output: logits over {len(names)} classes ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    where = "the extra file isomod.json (torch.jit.load(path, _extra_files=...))" if args.format == "torchscript" \
        else "the model's metadata (input 'images', output 'logits')"
    print(f"max abs difference from the model on 8 random inputs: {diff:.2e}; wrote {out} ({args.format}; task, class "
          f"names, input shape and value range in {where})")
    return 0


def export_several(args, model) -> int:
    """`isomod export --tasks A B ...`: one TorchScript file serving several tasks."""
    import torch

    from isomod.io.export import example_input, export_tasks, multi_metadata, save_torchscript

    if args.format != "torchscript":
        raise IsomodError("several tasks in one file: TorchScript only (an ONNX file holds one task; export each "
                          "with --task)")
    for name in args.tasks:
        model.check_task(name)
    net = export_tasks(model, args.tasks)
    x = example_input(model, args.tasks[0], batch=2 * len(args.tasks))
    index = torch.arange(len(x), device=x.device) % len(args.tasks)
    with torch.no_grad():
        diff = (net(x, index) - model(x, [args.tasks[i] for i in index.tolist()])).abs().nan_to_num(0.0).max().item()
    out = save_torchscript(net.cpu(), args.out, multi_metadata(model, args.tasks, net))
    print(f"tasks {', '.join(args.tasks)} in one file: forward(images, task index per image); max abs difference from "
          f"the model's mixed batch on {len(x)} random inputs: {diff:.2e}; wrote {out} (torchscript; tasks and class "
          "names in isomod.json)")
    return 0


def cmd_predict(args) -> int:
    from isomod.io.predict import predict_files

    if args.top < 1:
        raise IsomodError(f"--top must be >= 1, got {args.top}")
    model = load_model(args.from_, args.device, args.task_file)
    task = args.tasks if args.tasks else only_task(args, model)
    predictions, resized = predict_files(model, task, args.inputs, args.top)
    several = len({p["task"] for p in predictions}) > 1
    if args.json:
        print(json.dumps(predictions, indent=1))
    else:
        for p in predictions:
            under = f" ({p['task']})" if several else ""
            print(f"{p['file']}{under}: " + ", ".join(f"{c['class']} {c['p']:.3f}" for c in p["top"]))
    if resized:
        names = ", ".join(dict.fromkeys(p["task"] for p in predictions))
        h, w = model.specs[predictions[0]["task"]].input_shape[1:]
        print(f"note: {resized} of {len(predictions)} images resized to {h}x{w}, the size {names} was trained at",
              file=sys.stderr)
    return 0


# --- parsers ---------------------------------------------------------------------------------
def add_run_folder_options(p: argparse.ArgumentParser, resume: bool = False) -> None:
    p.add_argument("--force", action="store_true", help="start over in an --out folder that holds another run "
                   "(its checkpoint, log and events are removed first)")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint; every "
                       "option that changes what it computes must be as it was")
        p.add_argument("--extend", action="store_true", help="with --resume, continue to a longer --steps (the "
                       "learning-rate schedule is recomputed over the new length)")


def add_label_space(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-space", help="make your own folders / .npz files domains of this label space: tasks of "
                   "one label space share the classes and one head (an adaptation target must share the model's)")


def add_image_size(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--image-size", type=positive, help=f"side a folder's images are resized to (default {default})")


def cmd_task(args) -> int:
    """`isomod task list|add|remove`: a checkpoint's tasks, and task files in and out of it."""
    from isomod.io.checkpoint import save_checkpoint

    model = load_model(args.from_)
    model.require_routes(f"{args.from_}: isomod task")
    if args.action == "list":
        fingerprint = model.pool_fingerprint()
        print(f"{checkpoint_folder(args.from_)}: pool {fingerprint[:16]}, {len(model.pool)} modules, "
              f"{model.param_count():,} parameters")
        for name, spec in model.specs.items():
            route = model.route(name)
            print(f"  {name}: {spec.num_classes} classes, {model.task_param_count(name):,} numbers, route "
                  f"{route}{f', label space {spec.label_space}' if spec.label_space else ''}")
        return 0
    if not args.out:
        raise IsomodError(f"isomod task {args.action} writes a new checkpoint: give --out DIR")
    check_out_dir(Path(args.out))
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise IsomodError(f"--out {args.out}: exists and is not empty; give a new folder (the --from checkpoint is "
                          "never changed)")
    if args.action == "add":
        if not args.items:
            raise IsomodError("isomod task add: give one or more task folders")
        added = [model.load_task(folder) for folder in args.items]
        what = f"added {', '.join(added)}"
    else:
        if not args.items:
            raise IsomodError("isomod task remove: name one or more tasks")
        for name in args.items:
            model.check_task(name)
        for name in args.items:
            model.remove_task(name)
        what = f"removed {', '.join(args.items)}"
    out = save_checkpoint(model, Path(args.out))
    print(f"{what}; wrote {out} ({len(model.task_names)} task(s): {', '.join(model.task_names)})")
    return 0
