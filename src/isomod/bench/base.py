"""The skeleton that runs a bench, and the registry the CLI builds `isomod bench NAME` from
(results: `isomod.bench.results`; workers: `workers`; docs pages: `docs`; measures: `metrics`).

A benchmark is one module of this package. It owns one config dataclass (every default
in one place; nested dataclasses such as `model` and `train` become option groups), a
`plan(ctx)` that yields its work as stages of `Job`s (each a module-level function, its
arguments, and how its output is recorded), a `write_report(out, results)` that draws its
figures and writes `report.md`, and `summary(results)`, the lines the CLI prints at the
end. It registers itself with `register(Bench(...))`. `run_bench` owns the rest: the
output folder's check, `results.json` with resume (a job whose rows are there is not
planned again), `--jobs` worker processes, saving after every job, the report.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from isomod import distributed
from isomod.bench.results import MIGRATIONS, Results, job_environment, read_results, same_run, with_defaults
from isomod.bench.workers import Workers, check_jobs
from isomod.errors import IsomodError, check_out_dir

@dataclass
class Job:
    """One unit of a bench's work: `fn(*args)`, a module-level function (run in a worker
    process under `--jobs`, so its arguments must pickle), and `record(results, output)`,
    run in the main process, which adds what it returned to the results."""

    fn: Callable
    args: tuple
    record: Callable[["Results", Any], None]


@dataclass
class Context:
    """What a bench's plan sees: the output folder, the config, the results so far
    (resumed), whether jobs may show their own progress (one job at a time), `say` (prints
    when progress is on, on rank 0), and inputs given to `run_bench` directly."""

    out: Path
    config: Any
    results: "Results"
    progress: bool
    say: Callable[..., None]
    inputs: dict


@dataclass
class Bench:
    """A registered benchmark.

    Args:
        name: `isomod bench NAME`.
        help: one line for the CLI.
        config: the config dataclass; its defaults are the bench's defaults.
        plan: `plan(ctx)`, a generator of stages, each a list of `Job`s; a stage runs (side
            by side under `--jobs`) before the plan is asked for the next.
        write_report: `write_report(out_dir, results) -> report.md path`.
        summary: `summary(results) -> text` printed by the CLI after a run.
        unprefixed: the nested config whose options take no prefix (`--steps`, not
            `--train-steps`).
        describe: `describe(config, inputs)`, the JSON configuration `results.json` records
            (default: the config as a dict); resuming needs it unchanged.
        device: the device the bench's config asks for (`auto`, `cpu`, `cuda`).
        extra: top-level keys of `results.json` besides `bench`, `config` and `rows`.
        resume: keep the rows of an earlier run of the same configuration (False for
            timings, which compare only within one sitting).
        extensible: config lists a resumed run may extend (see `Results`).
        hidden: config fields the command line does not offer (`section.field`): those the
            bench sets itself, per run (a seed) or per method (a regime's pool size).
        migrate: `migrate(results) -> results`, an older version's `results.json` in today's
            names (a renamed method or regime); every read of the bench's results applies it.
    """

    name: str
    help: str
    config: type
    plan: Callable[[Context], Iterator[list[Job]]]
    write_report: Callable[[Path, dict], Path]
    summary: Callable[[dict], str]
    unprefixed: str = "train"
    describe: Callable[[Any, dict], dict] = lambda config, inputs: asdict(config)
    device: Callable[[Any], str] = lambda config: "auto"
    extra: tuple[str, ...] = ()
    resume: bool = True
    extensible: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    migrate: Callable[[dict], dict] | None = None

    def run(self, out_dir: str | Path, config=None, progress: bool = True, force: bool = False, **inputs) -> dict:
        return run_bench(self, out_dir, config if config is not None else self.config(), progress, force, **inputs)


def _call(fn: Callable, *args):
    return fn(*args)


def run_bench(bench: Bench, out_dir: str | Path, config, progress: bool = True, force: bool = False,
              **inputs) -> dict:
    """Run `bench` with `config` into `out_dir`: `results.json` (resumed when it holds a run
    of the same configuration, saved after every job; one of another configuration is
    refused unless `force`), then `report.md` and the figures. `inputs` reach the plan
    (`ctx.inputs`), e.g. data given instead of loaded. The folder is locked while the bench
    writes it; under torchrun, rank 0 alone writes."""
    from isomod.training.runs import RunLock

    distributed.setup(bench.device(config))
    out = Path(out_dir)
    check_out_dir(out)
    jobs = getattr(config, "jobs", 1)
    if jobs > 1 and distributed.world_size() > 1:
        raise IsomodError("--jobs runs several trainings side by side in one process group; under torchrun "
                          "every process already trains the same run: use one or the other")
    if not distributed.is_main():
        return _run_bench(bench, out, config, progress, force, inputs)
    with RunLock(out):
        return _run_bench(bench, out, config, progress, force, inputs)


def _run_bench(bench: Bench, out: Path, config, progress: bool, force: bool, inputs: dict) -> dict:
    from isomod.training.trainer import resolve_device

    jobs = getattr(config, "jobs", 1)
    described, defaults = bench.describe(config, inputs), asdict(type(config)())
    refuse_another_run(out / "results.json", bench, described, defaults, force)
    results = Results(out / "results.json", bench.name, described, resume=bench.resume,
                      extensible=bench.extensible, defaults=defaults,
                      environment=job_environment(resolve_device(bench.device(config)), jobs),
                      **{k: {} for k in bench.extra})
    main = distributed.is_main()
    say = (lambda *a: print(*a, flush=True)) if progress and main else (lambda *a: None)
    ctx = Context(out, config, results, progress and jobs == 1 and main, say, inputs)
    with Workers(jobs, preload=tuple(f"isomod.bench.{name}" for name in BENCHES)) as workers:  # one set for every stage
        for stage in bench.plan(ctx):
            stage = list(stage)
            for job, output in zip(stage, workers.map(_call, [(j.fn, *j.args) for j in stage])):
                job.record(results, output)
                if main:
                    results.save()
    if main:
        results.save()
        bench.write_report(out, results.data)
    return results.data


def refuse_another_run(path: Path, bench: Bench, config: dict, defaults: dict, force: bool) -> None:
    """Refuse, unless `force`, to replace a `results.json` of another configuration (or
    another bench) that this run would not resume; with `force`, empty the folder first
    (its runs were made under the other configuration)."""
    if not path.is_file() or not bench.resume:
        return
    old = read_results(path)
    config = json.loads(json.dumps(config))
    if old.get("bench") == bench.name and same_run(old.get("config"), config, bench.extensible,
                                                   json.loads(json.dumps(defaults))):
        return
    if force:
        from isomod.training.runs import LOCK

        for child in path.parent.iterdir():
            if child.name != LOCK:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        return
    theirs = with_defaults(old.get("config") or {}, json.loads(json.dumps(defaults)))
    keys = sorted(k for k in set(theirs) | set(config) if k != "jobs" and k not in bench.extensible
                  and theirs.get(k) != config.get(k))
    what = f"bench {old.get('bench')!r}" if old.get("bench") != bench.name else f"other {', '.join(keys[:5])}"
    raise IsomodError(f"{path} holds a run of {what}; run the same configuration again to resume it, or use "
                      "--force (it is replaced) or another --out")


BENCHES: dict[str, Bench] = {}


def check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise IsomodError("give at least one seed")


def register(bench: Bench) -> Bench:
    BENCHES[bench.name] = bench
    if bench.migrate is not None:
        MIGRATIONS[bench.name] = bench.migrate
    return bench
