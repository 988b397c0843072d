"""Trainer: the one training loop. Task-homogeneous batches interleaved across tasks
(`isomod.training.batches`), parameter groups with their own learning rates, the learning-rate
schedule (`isomod.training.config`), the route schedule's hooks, logging, checkpoints, resume
and signals, one process or many.

The loss lives outside the model: an *objective* (`isomod.training.objectives`) maps a model and a
batch to a loss, logits and metrics, and may own parameters or ask for more batches, so
multi-task training, route-only transfer, unlabelled adaptation and alignment with labelled
sources are objectives and parameter choices given to one Trainer, not copies of a loop.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from isomod import distributed
from isomod.training.batches import Batches, TaskDraws, evaluate, random_shift
from isomod.io.checkpoint import check_compatible, checkpoint_exists, load_trainer_state, load_weights, save_checkpoint
from isomod.files import write_atomic
from isomod.data.tasks import TaskData
from isomod.errors import CheckpointError, Interrupted, IsomodError, TrainingDiverged, check_out_dir
from isomod.training.grouped import GroupedForward, grouped_refusal
from isomod.training.logs import Progress, RunLog
from isomod.core.network import ROLES, TaskModel, to_float
from isomod.training.objectives import Batch, Objective, Output, as_objective, cross_entropy
from isomod.training.route_schedule import RouteSchedule
from isomod.training.runs import RunLock, check_resumed_config, check_start
from isomod.training.config import (BATCH_ORDERS, PRECISIONS, SAMPLINGS, SCHEDULES, TrainConfig, device_settings,
                                    forward_options, resolve_device, route_schedule)
from isomod import seeds

# What the rest of the library and its users import from here.
__all__ = ["BATCH_ORDERS", "PRECISIONS", "SAMPLINGS", "SCHEDULES", "Batches", "StepOrder", "Trainer", "TrainConfig",
           "check_out_dir", "cross_entropy", "evaluate", "forward_options", "random_shift", "resolve_device",
           "route_schedule", "to_float"]


DRAW_CHUNK = 1000  # task draws made at once: between log steps further apart, one read per chunk


class StepOrder:
    """The model as an objective sees it for one batch whose route runs its steps' weights
    in another order (`step_order`: exchanged steps) or runs other modules (`modules`: a
    random route); everything else is the model's."""

    def __init__(self, model, **override):
        self.model, self.override = model, override

    def __call__(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.model(x, task, **self.override)

    def forward_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.model.forward_features(x, task, **self.override)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def optimizer_kernels(device: torch.device) -> dict[str, bool]:
    """How AdamW updates the parameters on `device`: on a GPU `fused` (one kernel for every
    tensor, the step counts kept on the device); on the CPU `foreach` (one call per group
    instead of one per tensor: a task owns many small tensors, its norms), which keeps the
    CPU's results as they were (the pinned digests). The fused kernel on the CPU would take
    the optimizer's ATen calls of an 8-task step from 8,613 to 2,320 but round differently."""
    return {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}


@dataclass
class _Run:
    """What one call of `fit` holds while it runs."""

    optimizer: torch.optim.Optimizer
    batches: Batches
    forward: Callable
    autocast: torch.autocast
    trainable: list[torch.Tensor]
    draws: TaskDraws
    running: dict  # task -> running training accuracy, a float64 tensor on the device (NaN: none yet)
    bar: Progress | None = None
    loss_ema: torch.Tensor | None = None  # float64, on the device
    metrics: dict = field(default_factory=dict)
    diverged: torch.Tensor | None = None  # (first step with a non-finite loss, that loss), -1 while none
    chosen: dict = field(default_factory=dict)  # step -> the tasks it trained, since the last check
    grouped: GroupedForward | None = None  # the step's tasks as one forward pass (`config.group_tasks`)


class Trainer:
    """Trains any TaskModel on several tasks with one objective; under `torchrun`, data-parallel
    over the processes (`isomod.distributed`), rank 0 alone logging and checkpointing.

    Args:
        model: ModularNet or a baseline.
        tasks: the tasks to train, by name or as a list, and any task an objective draws
            extra batches from. Unlabelled data carries labels of -1 (see `isomod.methods.adapt`);
            tasks without test images are not evaluated.
        config: budget and schedule.
        out_dir: run folder for `checkpoint/`, `log.jsonl`, TensorBoard events and
            `train_config.json`; None trains without writing anything.
        objective: an `isomod.training.objectives.Objective` or a function `(model, x, y, task) ->
            (loss, logits)`; `cross_entropy` by default. Its own parameters train at `lr`.
        progress: show progress (a bar on a terminal, plain lines otherwise).
        train_tasks: the subset of `tasks` to draw batches from (default: all).
        params: what trains, by role (`stem`, `pool`, `routes`, `norms`, `heads`), e.g.
            `model.param_groups([task])` for a task's own parameters. Default: every
            trainable parameter (`model.param_groups()`). Nothing else of the model trains
            during `fit`; every `requires_grad` flag and training mode is as it was after,
            except that a route the schedule discretised is left frozen.
        routes: the route schedule (temperature, entropy, discretisation, exchanged
            steps); default `route_schedule(config)`.
        frozen_norm_stats: a norm whose affine parameters do not train keeps its running
            statistics; False lets every norm of a trained task normalise with batch
            statistics (statistics that follow a route being learned on new data).
            Statistics-only norms (the steps' norms when the modules own the affine
            parameters) normalise with batch statistics, unless `fixed_stats` holds them.
        fixed_stats: modules whose norms keep their running statistics (eval mode) while
            training, e.g. the step norms under a linear probe's frozen features.
        record: what else `train_config.json` records beside the budget (the tasks, the
            model, the regime, the command that ran it).
    """

    def __init__(self, model: TaskModel, tasks: dict[str, TaskData] | list[TaskData], config: TrainConfig,
                 out_dir: str | Path | None = None, objective: Objective | Callable = cross_entropy,
                 progress: bool = True, train_tasks: list[str] | None = None,
                 params: dict[str, list[torch.nn.Parameter]] | None = None, routes: RouteSchedule | None = None,
                 frozen_norm_stats: bool = True, fixed_stats: list[torch.nn.Module] = (), record: dict | None = None):
        self.tasks = {t.name: t for t in tasks} if isinstance(tasks, list) else dict(tasks)
        self.train_tasks = list(train_tasks or self.tasks)
        for name in self.train_tasks:
            model.check_task(name)
        self.model = model
        self.config = config
        self.objective = as_objective(objective)
        self.params = {k: list(dict.fromkeys(v)) for k, v in (params or model.param_groups()).items() if v}
        unknown = sorted(set(self.params) - set(ROLES))
        if unknown:
            raise IsomodError(f"unknown parameter role(s) {unknown}; known: {', '.join(ROLES)}")
        if not self.params:
            raise IsomodError("nothing to train: no parameters were given")
        self.route_schedule = routes or route_schedule(config)
        self._route_ids = {id(p) for p in self.params.get("routes", [])}
        distributed.setup(config.device)
        self.main = distributed.is_main()
        self.progress = progress and self.main
        self.frozen_norm_stats = frozen_norm_stats
        self.fixed_stats = {id(m) for owner in fixed_stats for m in owner.modules()}
        self.device = resolve_device(config.device)
        if config.batch_size < distributed.world_size():
            raise IsomodError(f"batch size {config.batch_size} is smaller than the {distributed.world_size()} "
                              "data-parallel processes; each needs at least one image")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            check_out_dir(self.out_dir)
        self.log = RunLog(None)
        self.step = 0
        self.history: list[dict] = []
        self.soft_usage: dict[str, list] | None = None  # route weights just before discretising
        self.record = dict(record or {})
        self._saved_flags: list | None = None
        self._discretized: list = []  # routes the schedule froze during this run
        self._lock: RunLock | None = None
        self._stop: int | None = None
        self._extension: str | None = None

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint" if self.out_dir else None

    # --- what trains, and in which mode --------------------------------------------
    def _set_trainable(self) -> None:
        """Gradients for the given parameters only; the flags and modes found are kept to
        be put back at the end."""
        self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._discretized = []
        self._saved_modes = [(m, m.training) for m in self.model.modules()]
        trained = {id(p) for ps in self.params.values() for p in ps}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trained)

    def _restore(self) -> None:
        if self._saved_flags is None:
            return
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        for route in self._discretized:  # frozen by the schedule, as `set_choice` leaves a route
            route.logits.requires_grad_(False)
        for m, training in self._saved_modes:
            m.training = training
        self._saved_flags = None

    def _train_mode(self) -> None:
        # A norm whose affine parameters are all frozen keeps its running statistics too,
        # so a frozen feature extractor (a linear probe's) computes the same features in
        # training as at test time.
        self.model.train()
        self.objective.train()
        for m in self.model.norm_layers():
            params = list(m.parameters(recurse=False))
            frozen = self.frozen_norm_stats and params and not any(p.requires_grad for p in params)
            if frozen or id(m) in self.fixed_stats:
                m.eval()

    def _labelled(self) -> dict[str, TaskData]:
        return {t: self.tasks[t] for t in self.train_tasks if len(self.tasks[t].y_test)}

    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        lrs = {"stem": c.lr, "pool": c.lr, "norms": c.lr, "routes": c.lr_routes, "heads": c.lr_heads,
               "objective": c.lr}
        decay = {"stem": c.weight_decay, "pool": c.weight_decay, "heads": c.weight_decay,
                 "objective": c.weight_decay}
        own = [p for p in self.objective.parameters() if p.requires_grad]
        params = {**self.params, **({"objective": own} if own else {})}
        groups = [{"params": ps, "lr": lrs[name], "base_lr": lrs[name], "weight_decay": decay.get(name, 0.0),
                   "name": name} for name, ps in params.items()]
        return torch.optim.AdamW(groups, betas=(0.9, 0.99), **optimizer_kernels(self.device))

    def _task_weights(self) -> torch.Tensor:
        if self.config.sampling == "uniform":
            return torch.ones(len(self.train_tasks))
        return torch.tensor([float(len(self.tasks[t].y_train)) for t in self.train_tasks])

    # --- checkpoints ------------------------------------------------------------------
    def _state(self, run: _Run) -> dict:
        """The trainer's state as tensors and plain values (read back with weights_only)."""
        return {"step": self.step, "optimizer": run.optimizer.state_dict(), "batches": run.batches.state_dict(),
                "sampler": run.draws.state(), "aug": self.aug.get_state(), "torch_rng": torch.get_rng_state(),
                "objective": self.objective.state_dict(), "train_config": asdict(self.config)}

    def _save(self, run: _Run) -> None:
        self._check_finite(run)  # a diverged run never overwrites its last good checkpoint
        if self.checkpoint_path is None:
            return
        if not self.main:
            distributed.barrier()  # no rank runs ahead of a checkpoint being written
            return
        if run.grouped is not None:
            run.grouped.write_back()
        save_checkpoint(self.model, self.checkpoint_path, trainer_state=self._state(run), extra={"step": self.step})
        distributed.barrier()

    def _resume(self, run: _Run, state: dict) -> None:
        try:
            run.optimizer.load_state_dict(state["optimizer"])
            run.batches.load_state_dict(state["batches"])
            self.sampler.set_state(state["sampler"])
            self.aug.set_state(state["aug"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("objective"):
                self.objective.load_state_dict(state["objective"])
            self.step = int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.checkpoint_path / 'trainer.pt'}: trainer state does not fit this run "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None

    def _read_resume_state(self, extend: bool) -> dict | None:
        """The checkpoint's trainer state when resuming is possible; checked before anything
        of the run folder is written, so a refused resume changes nothing."""
        path = self.checkpoint_path
        if path is None or not checkpoint_exists(path):
            return None
        check_compatible(self.model, path)
        state = load_trainer_state(path)
        if state is None:
            raise CheckpointError(f"{path}: no trainer state to resume from")
        saved = state.get("train_config")
        if isinstance(saved, dict):
            self._extension = check_resumed_config(saved, asdict(self.config), extend)
        return state

    def _open_folder(self, resume: bool | str, force: bool) -> bool:
        """Lock the run folder and check it may hold this run; whether to resume."""
        if self.out_dir is None or not self.main:
            return bool(resume) and self.out_dir is not None
        self._lock = RunLock(self.out_dir).__enter__()
        if resume == "auto":
            resume = checkpoint_exists(self.out_dir / "checkpoint")
            force = force or not resume
        check_start(self.out_dir, bool(resume), force)
        return bool(resume)

    # --- the loop -----------------------------------------------------------------------
    def fit(self, resume: bool | str = False, force: bool = False, extend: bool = False) -> dict[str, float]:
        """Train to `config.steps`; returns test accuracy per task.

        The run folder (`out_dir`) is locked while the run writes it; a folder that holds
        another run is refused unless `resume` or `force`. SIGTERM or SIGINT end the run
        after the step in progress, with a checkpoint of that step (`Interrupted`).

        Args:
            resume: continue from `out_dir/checkpoint` (True: one must be there; `"auto"`:
                when it is, else start afresh). The model config, tasks and every option
                that changes what the run computes must be as they were; on a mismatch
                nothing is written or changed.
            force: start over in a folder that holds another run, clearing its files.
            extend: with `resume`, allow a longer `steps` than the run was set up with
                (the learning-rate schedule is recomputed over the new length).
        """
        run = None
        try:
            run = self.start(resume, force, extend)
            self._catch_signals()
            while self.step < self.config.steps:
                if self.step == self.route_schedule.discretize_step and self._discretize(run.bar):
                    break
                self.train_step(run)
                if self._stop is not None:
                    self._interrupt(run)
            run.bar.close()
            self._save(run)
            return self._evaluate(run)
        finally:
            self._release_signals()
            self.finish(run)

    def _interrupt(self, run: _Run) -> None:
        """Save the step just finished and stop, saying how to go on."""
        import signal

        name = signal.Signals(self._stop).name
        self._save(run)
        self.log.write(event="interrupted", step=self.step, signal=name)
        where = f"checkpoint of step {self.step} saved in {self.checkpoint_path}" if self.checkpoint_path else \
            "nothing saved (no run folder)"
        raise Interrupted(f"stopped by {name} at step {self.step} of {self.config.steps}: {where}", self._stop,
                          self.checkpoint_path)

    def _catch_signals(self) -> None:
        """From now on SIGTERM and SIGINT ask the loop to stop after the step in progress (a
        second one stops at once)."""
        import signal
        import threading

        self._stop = None
        if threading.current_thread() is not threading.main_thread():
            return

        def ask(signum, frame):
            if self._stop is not None:
                raise KeyboardInterrupt
            self._stop = signum

        self._handlers = {s: signal.signal(s, ask) for s in (signal.SIGTERM, signal.SIGINT)}

    def _release_signals(self) -> None:
        import signal

        for s, handler in getattr(self, "_handlers", {}).items():
            signal.signal(s, handler)
        self._handlers = {}

    def start(self, resume: bool | str = False, force: bool = False, extend: bool = False) -> _Run:
        """Everything a run needs before its first step: the run folder locked and checked,
        the model on its device with what trains switched on, the optimiser, the batches and
        the random generators (restored from the checkpoint when resuming)."""
        c = self.config
        resume = self._open_folder(resume, force)
        state = self._read_resume_state(extend) if resume else None
        seeds.seed(c.seed)
        device_settings(self.device)
        self.model.to(self.device)
        self.objective.to(self.device)
        if state is not None:
            load_weights(self.model, self.checkpoint_path)
        self._set_trainable()
        self._train_mode()
        batches = Batches(self.tasks, c.batch_size, c.seed, c.batch_order, self.device)
        self.sampler = torch.Generator().manual_seed(c.seed + 1)
        self.aug = torch.Generator().manual_seed(c.seed + 2)
        optimizer = self._optimizer()
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        forward, autocast = forward_options(self.model, self.device, c.precision, c.compile, c.compile_mode)
        k = min(c.tasks_per_step, len(self.train_tasks))
        nan = torch.full((), float("nan"), dtype=torch.float64, device=self.device)
        run = _Run(optimizer, batches, forward, autocast, trainable, TaskDraws(self.sampler, self._task_weights(), k),
                   {t: nan for t in self.train_tasks},
                   diverged=torch.tensor([-1.0, 0.0], dtype=torch.float64, device=self.device))
        if state is not None:
            self._resume(run, state)
            run.draws.set_state(self.sampler.get_state())
        if c.group_tasks:
            run.grouped = self._grouped()
        run.draws.refill(self._to_next_log())
        run.bar = Progress(c.steps, self.step, self.progress)
        if self.out_dir and self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out_dir / "train_config.json",
                         lambda f: f.write(json.dumps({**asdict(c), **self.record}, indent=2).encode()))
            self.log = RunLog(self.out_dir / "log.jsonl")
            if state is not None:
                self.log.write(event="resume", step=self.step, extension=self._extension)
                # Said whether or not progress is shown: a resumed run must never pass for a fresh one.
                print(f"resuming {self.out_dir} from step {self.step} of {c.steps}"
                      + (f"; {self._extension}" if self._extension else ""), file=sys.stderr, flush=True)
        distributed.broadcast_module(self.model)
        distributed.broadcast_module(self.objective)
        return run

    def _grouped(self) -> GroupedForward:
        """The grouped forward pass of the tasks this run trains, or a one-line refusal of
        `group_tasks` naming what stands in its way."""
        c = self.config
        why = grouped_refusal(self.model, self.tasks, self.train_tasks, c.batch_size)
        if why is None and getattr(self.objective, "fn", None) is not cross_entropy:
            why = f"it trains the supervised cross-entropy only, not {type(self.objective).__name__}"
        if why is None and (c.route_swap or c.route_random):
            why = "each task's batch runs its own route (route_swap and route_random must be 0)"
        if why is None and c.compile:
            why = "it runs eagerly (compile must be empty)"
        if why is not None:
            raise IsomodError(f"group_tasks cannot train this run: {why}")
        return GroupedForward(self.model, self.train_tasks)

    def finish(self, run: _Run | None) -> None:
        """Close the progress bar and the log; put back the flags and modes `start` changed;
        unlock the run folder."""
        if run is not None and run.grouped is not None:
            run.grouped.write_back()
        if run is not None and run.bar is not None:
            run.bar.close()
        self.log.close()
        self._restore()
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def train_step(self, run: _Run) -> None:
        """One step of the schedule: learning rates, route temperatures, the tasks drawn,
        one optimiser step, then logging, evaluation and checkpoints when they are due."""
        c = self.config
        factor = c.lr_factor(self.step)
        for group in run.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        temperature = self.route_schedule.temperature(self.step)
        for route in self._trained_routes():
            route.temperature.fill_(temperature)
        chosen = [self.train_tasks[i] for i in run.draws.next()]
        run.chosen[self.step] = chosen
        total = self.optimizer_step(run, chosen).double()
        self.step += 1
        run.loss_ema = total if run.loss_ema is None else 0.95 * run.loss_ema + 0.05 * total
        run.bar.update(1)
        if self.step % c.log_every == 0 or self.step == c.steps:
            self._log_step(run, c.lr * factor, temperature)
            run.draws.refill(self._to_next_log())
        if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
            self._evaluate(run)
        if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < c.steps:
            self._save(run)

    def _to_next_log(self) -> int:
        """Steps from this one to the next log step (or the run's end), at most `DRAW_CHUNK`."""
        c = self.config
        return max(1, min(c.log_every - self.step % c.log_every, c.steps - self.step, DRAW_CHUNK))

    def optimizer_step(self, run: _Run, chosen: list[str]) -> torch.Tensor:
        """One optimiser step on one batch of each task in `chosen`; returns the loss (on the
        device: nothing in a step reads a tensor's value back)."""
        c = self.config
        run.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        if run.grouped is not None:
            return self._grouped_step(run, chosen)
        for task in chosen:
            x, y, global_batch = self._batch(run, task)
            with run.autocast:
                out = self.objective(self._bound(run.forward, task), Batch(task, x, y, self.step / c.steps,
                                                                          run.batches))
            total = total + share(out.loss, y, global_batch, len(chosen))
            self._track(run, task, y, out)
        return self._backward_and_step(run, total)

    def _batch(self, run: _Run, task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This process's share of the next batch of `task` on the device (augmented), and the
        global batch size."""
        x, y, global_batch = run.batches.next(task)
        if x.device != self.device and self.device.type == "cuda":  # host images: an asynchronous copy
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        x, y = to_float(x.to(self.device)), y.to(self.device)
        if self.config.augment:
            x = random_shift(x, self.aug, part=distributed.shard(global_batch), total=global_batch)
        return x, y, global_batch

    def _grouped_step(self, run: _Run, chosen: list[str]) -> torch.Tensor:
        """`optimizer_step` with the tasks' batches as one forward pass (`GroupedForward`)."""
        batches = [self._batch(run, task) for task in chosen]
        with run.autocast:
            logits = run.grouped([x for x, _, _ in batches], chosen)
        total = 0.0
        for task, (x, y, global_batch), out in zip(chosen, batches, logits):
            loss = F.cross_entropy(out, y)
            total = total + share(loss, y, global_batch, len(chosen))
            self._track(run, task, y, Output(loss, out))
        return self._backward_and_step(run, total)

    def _backward_and_step(self, run: _Run, total: torch.Tensor) -> torch.Tensor:
        """The route penalty added to the step's loss `total`, its backward pass, the
        gradients averaged over processes and the optimiser's step; the loss."""
        penalty = self.route_schedule.penalty(self.step, self._trained_routes())
        if penalty is not None:
            total = total + penalty
        total.backward()
        # All ranks see the same averaged loss, so all of them stop together on divergence,
        # at the next log step or checkpoint (`_check_finite`), naming the first bad step.
        total = distributed.average_gradients(run.trainable, total)
        bad = ~torch.isfinite(total) & (run.diverged[0] < 0)
        run.diverged = torch.where(bad, torch.stack([total.new_tensor(self.step).double(), total.double()]),
                                   run.diverged)
        run.optimizer.step()
        return total.detach()

    def _check_finite(self, run: _Run) -> None:
        """Stop, keeping the last good checkpoint, when a step's loss was not finite."""
        step, value = run.diverged.tolist()
        tasks, run.chosen = run.chosen, {}
        if step >= 0:
            kept = self.checkpoint_path if self.checkpoint_path and self.checkpoint_path.exists() else None
            self.log.write(event="diverged", step=int(step))
            raise TrainingDiverged(f"loss became {value} at step {int(step)} (tasks {tasks.get(int(step))}); training "
                                   f"stopped, last good checkpoint: {kept or 'none written yet'}")

    def _track(self, run: _Run, task: str, y: torch.Tensor, out: Output) -> None:
        """Running training accuracy of a labelled batch, and the objective's metrics, kept on
        the device until a log step reads them."""
        if out.logits is not None:
            acc = (out.logits.argmax(-1) == y).float().mean().double()
            old = run.running[task]
            new = torch.where(torch.isnan(old), acc, 0.9 * old + 0.1 * acc)
            run.running[task] = torch.where((y >= 0).any(), new, old)
        for name, value in out.metrics.items():
            total, count = run.metrics.get(name, (0.0, 0))
            run.metrics[name] = (total + (value.detach() if torch.is_tensor(value) else value), count + 1)

    def _bound(self, forward, task: str):
        """The forward pass a batch of `task` runs: a random route when the route schedule
        draws one (while the pool trains), or with two of its route's steps exchanged when
        it asks for it (a trained soft route only)."""
        schedule = self.route_schedule
        if not self.model.has_routes or (schedule.swap == 0 and schedule.random == 0):
            return forward
        route = self.model.route(task)
        if schedule.random and any(p.requires_grad for p in self.model.pool.parameters()):
            modules = schedule.random_route(route.steps, len(self.model.pool), self.aug)
            if modules is not None:
                return StepOrder(forward, modules=modules)
        if schedule.swap == 0 or id(route.logits) not in self._route_ids or route.is_discrete:
            return forward
        order = schedule.step_order(route.steps, self.aug)
        return forward if order is None else StepOrder(forward, step_order=order)

    def _trained_routes(self) -> list:
        """The soft routes this run trains (a route that is only run, not trained, is left
        as it is: its temperature, and soft or not)."""
        if not self.model.has_routes:
            return []
        return [r for r in self.model.soft_routes(self.train_tasks) if id(r.logits) in self._route_ids]

    def _discretize(self, bar: Progress) -> bool:
        """Freeze the trained routes to their argmax; True when nothing is left to train."""
        routes = self._trained_routes()
        if not routes:
            return False
        usage = self.model.usage(self.train_tasks)
        self.soft_usage = {n: w.tolist() for n, w in usage.items()}
        self.log.routes(self.step, usage)
        for route in routes:
            route.discretize()
        self._discretized.extend(routes)
        self.log.write(event="discretize", step=self.step, route_weights=self.soft_usage)
        if any(p.requires_grad for ps in self.params.values() for p in ps):
            return False
        # Only routes were trained: the remaining steps would change nothing.
        self.log.write(event="nothing left to train", step=self.step)
        bar.update(self.config.steps - self.step)
        self.step = self.config.steps
        return True

    def _log_step(self, run: _Run, lr: float, temperature: float) -> None:
        """Read what the steps since the last log step kept on the device, and write it."""
        self._check_finite(run)
        values = torch.stack(list(run.running.values())).tolist()  # one read per log step
        accs = {t: round(a, 4) for t, a in zip(run.running, values) if a == a}
        metrics = {name: round(float(total) / count, 6) for name, (total, count) in run.metrics.items()}
        run.metrics = {}
        loss = float(run.loss_ema)
        record = {"step": self.step, "loss": round(loss, 5), "lr": lr, "temperature": temperature,
                  "train_acc": accs, **metrics, "time": round(time.time() - run.bar.t0, 2)}
        self.history.append(record)
        self.log.write(**record)
        self.log.scalars(self.step, {"loss": loss, "lr": lr, "temperature": temperature, **metrics,
                                     **{f"train_acc/{t}": a for t, a in accs.items()}})
        shown = "".join(f", {k} {v:.3f}" for k, v in metrics.items())
        accuracy = ", train acc " + " ".join(f"{short(t)} {a:.2f}" for t, a in accs.items()) if accs else ""
        # The values are those of this log step; a plain progress line between log steps says so.
        run.bar.set_postfix(f"at step {self.step}: train loss {loss:.3f}{shown}{accuracy}")

    def _evaluate(self, run: _Run) -> dict[str, float]:
        if run.grouped is not None:
            run.grouped.write_back()
        bar = run.bar
        accs = evaluate(self.model, self._labelled())
        self.log.write(event="eval", step=self.step, test_acc=accs)
        self.log.scalars(self.step, {f"test_acc/{t}": a for t, a in accs.items()})
        if self.model.has_routes:
            self.log.routes(self.step, self.model.usage(self.train_tasks))
        if self.step < self.config.steps:
            bar.write(f"step {self.step}: test acc " + " ".join(f"{short(t)} {a:.3f}" for t, a in accs.items()))
        return accs


def share(loss: torch.Tensor, y: torch.Tensor, global_batch: int, tasks: int) -> torch.Tensor:
    """A task's part of a step's loss: its batch's mean `loss` over `tasks` tasks, weighted so
    that the average over data-parallel ranks is the global batch's mean loss."""
    return distributed.world_size() * len(y) / global_batch * loss / tasks


def short(task: str) -> str:
    """A task's label in progress lines: its name without the suite (`glyphs/latin_upper` ->
    `latin_upper`)."""
    return task.rsplit("/", 1)[-1]
