"""What every benchmark shares: the result row, the results file, the skeleton that runs a
bench, and the registry the CLI builds `isomod bench NAME` from.

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
import platform
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from isomod import distributed
from isomod.files import write_atomic
from isomod.errors import IsomodError, check_out_dir

ROW_KEYS = ("method", "task", "metric", "value")


@dataclass
class Row:
    """One measured number: `method` on `task`, `metric` = `value`; `fields` holds the
    rest (`params_total`, `params_task`, `seed`, and a bench's own keys such as `shots`)."""

    method: str
    task: str
    metric: str
    value: float
    fields: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "task": self.task, "metric": self.metric, "value": self.value, **self.fields}


def environment(device: str | torch.device | None = None) -> dict:
    """What a result was computed with: thread count and device change the numbers a
    training run ends with, so every `results.json` records them (and the code's commit,
    when it runs from a git checkout)."""
    env = {"threads": torch.get_num_threads(), "device": str(device) if device is not None else "cpu",
           "torch": torch.__version__, "python": platform.python_version()}
    commit = code_commit()
    return {**env, "commit": commit} if commit else env


def code_commit() -> str | None:
    """The commit of the checkout isomod's code is imported from (with `+changes` when files
    differ from it), or None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def with_defaults(old: dict, defaults: dict) -> dict:
    """`old` with the keys it lacks (options added since it was written) taken from
    `defaults`, nested mappings key by key."""
    out = dict(old)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_defaults(out[key], value)
    return out


def same_run(old: object, new: dict, extensible: tuple[str, ...] = (), defaults: dict | None = None) -> bool:
    """Whether an existing `results.json`'s configuration `old` is that of `new`, `jobs` and
    the `extensible` lists (methods, seeds, ... whose rows stand on their own) aside. An
    option `old` lacks counts as its default from `defaults` (it did not exist then, and its
    default keeps what it changes as it was)."""
    if not isinstance(old, dict):
        return False
    old = with_defaults(old, defaults or {})
    drop = {"jobs", *extensible}
    return {k: v for k, v in old.items() if k not in drop} == {k: v for k, v in new.items() if k not in drop}


def merged_config(old: dict, new: dict, extensible: tuple[str, ...]) -> dict:
    """`new`, each extensible list holding the old items first, then the new ones: the rows
    of both runs are described."""
    out = dict(new)
    for key in extensible:
        if isinstance(old.get(key), list) and isinstance(new.get(key), list):
            out[key] = old[key] + [v for v in new[key] if v not in old[key]]
    return out


class Results:
    """The contents of a bench's `results.json`: `bench`, `config`, `rows` and any other
    top-level keys (routes, timings), saved atomically after every change a caller asks for.

    Args:
        path: the `results.json` file.
        bench: the benchmark's name.
        config: the JSON-serialisable configuration of the run.
        resume: keep the rows of an existing file made with the same configuration (how
            many runs went side by side, `jobs`, changes no result and is not compared).
        extensible: config lists a resumed run may extend (more methods, seeds or
            shots): the rows already there are kept, the recorded lists become the union.
        defaults: the config's defaults, standing in for options an older file lacks.

    `environment` (an `extra` key) is where the rows were made. A resumed run made in
    another one (another commit, thread count or device) that adds rows records each
    sitting under `sittings`: its environment and the index of its first row.
    """

    def __init__(self, path: str | Path, bench: str, config: dict, resume: bool = False,
                 extensible: tuple[str, ...] = (), defaults: dict | None = None, **extra):
        self.path = Path(path)
        self.data = {"bench": bench, "config": json.loads(json.dumps(config)), "rows": [], **extra}
        self._new_sitting = None
        if resume and self.path.is_file():
            old = read_results(self.path)
            if same_run(old.get("config"), self.data["config"], extensible, json.loads(json.dumps(defaults or {}))):
                here = json.loads(json.dumps(self.data.get("environment")))
                self.data = {**self.data, **old, "config": merged_config(old["config"], self.data["config"],
                                                                         extensible)}
                if here is not None and self.rows and here != self.sittings()[-1]["environment"]:
                    self._new_sitting = here

    def sittings(self) -> list[dict]:
        """Each sitting's `environment` and `first_row`, the first one's at row 0."""
        return self.data.get("sittings") or [{"environment": self.data.get("environment"), "first_row": 0}]

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def __getitem__(self, key: str):
        return self.data[key]

    def add(self, *rows: Row) -> None:
        if rows and self._new_sitting is not None:
            self.data["sittings"] = [*self.sittings(), {"environment": self._new_sitting,
                                                        "first_row": len(self.rows)}]
            self._new_sitting = None
        for row in rows:
            if not isinstance(row, Row):
                raise IsomodError(f"a result row is a Row ({', '.join(ROW_KEYS)} and fields), got {type(row).__name__}")
            self.rows.append(row.to_dict())

    def has(self, **match) -> bool:
        """Whether a row with these field values exists (a field a row lacks counts as None)."""
        return any(all(r.get(k) == v for k, v in match.items()) for r in self.rows)

    def save(self) -> Path:
        """Write `results.json` atomically: a stopped benchmark never leaves half a file."""
        write_atomic(self.path, lambda f: f.write(json.dumps(self.data, indent=2).encode()))
        return self.path


def read_results(path: str | Path) -> dict:
    """A `results.json` file, checked: a JSON object with `bench` and a list of `rows`."""
    path = Path(path)
    if not path.is_file():
        raise IsomodError(f"{path} not found: run a benchmark with --out {path.parent} first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IsomodError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "bench" not in data:
        raise IsomodError(f"{path}: not a benchmark's results (a JSON object with 'bench' and a list of 'rows')")
    sittings = data.get("sittings", [])
    if not isinstance(sittings, list) or not all(
            isinstance(s, dict) and type(s.get("first_row")) is int
            and isinstance(s.get("environment"), (dict, type(None))) for s in sittings):
        raise IsomodError(f"{path}: 'sittings' must be a list of objects with an integer 'first_row' and an "
                          "'environment' object")
    return data


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
    with Workers(jobs) as workers:  # one set of worker processes for every stage
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


def check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise IsomodError(f"jobs must be >= 1, got {jobs}")


def register(bench: Bench) -> Bench:
    BENCHES[bench.name] = bench
    return bench


DOCS_BEGIN, DOCS_END = "<!-- isomod report: begin -->", "<!-- isomod report: end -->"


def write_docs(page: Path, source: str, results: dict, block: str) -> None:
    """Replace the generated block of a `docs/results/<bench>.md` page (between the
    DOCS_BEGIN and DOCS_END markers; appended when absent) by the tables of `results`
    (read from `source`, a run folder or a results file); the hand-written text around it
    stays."""
    def where(env: dict | None) -> str:
        return ", ".join(f"{k} {v}" for k, v in (env or {}).items()) or "environment not recorded"

    sittings = results.get("sittings")
    if sittings:  # a run resumed elsewhere: which rows came from where
        ends = [s["first_row"] for s in sittings[1:]] + [len(results["rows"])]
        made = "; ".join(f"rows {s['first_row'] + 1}-{end}: {where(s['environment'])}"
                         for s, end in zip(sittings, ends))
    else:
        made = where(results.get("environment"))
    what = f"`{Path(source).name}`" if str(source).endswith(".json") else "its `results.json`"
    generated = "\n".join([DOCS_BEGIN, f"Generated by `isomod report {source} --docs {page}` from {what} ({made}).",
                           "", block, DOCS_END])
    text = page.read_text() if page.is_file() else f"# {results['bench']}\n\n"
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        text = head + generated + rest.split(DOCS_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + generated + "\n"
    write_atomic(page, lambda f: f.write(text.encode()))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_context():
    """On Linux, worker processes forked from a fresh server that has imported the benches,
    torch and the part of torch its optimisers import on first use (some 4 s a process):
    the server pays the imports once for every worker this process starts (importing
    them initialises no device). Elsewhere each worker is a fresh interpreter (spawn;
    macOS forks badly). Never a fork of this process, whose thread pools a fork would
    copy in an unknown state."""
    import multiprocessing
    import sys

    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*(f"isomod.bench.{name}" for name in BENCHES), "torch._dynamo"])
    return context


class Workers:
    """Runs calls in this process when `jobs` is 1, otherwise in `jobs` worker processes
    side by side, each with `threads // jobs` threads (training runs that each use every
    core slow each other down many times over; one thread each does not). The processes
    start at the first call that needs them and serve every later one until the `with`
    block ends: a bench's stages share them."""

    def __init__(self, jobs: int = 1):
        check_jobs(jobs)
        self.jobs, self._pool = jobs, None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable, calls: list[tuple]) -> Iterator:
        """`fn(*args)` for every `args` in `calls`, yielded in order. `fn` must be a
        module-level function and its arguments picklable when `jobs` > 1."""
        if self.jobs == 1 or len(calls) <= 1:
            for args in calls:
                yield fn(*args)
            return
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, torch.get_num_threads() // self.jobs)
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=_worker_context(), initializer=_init_worker,
                                             initargs=(threads,))
        futures = [self._pool.submit(fn, *args) for args in calls]
        try:
            for future in futures:
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def job_environment(device: str | torch.device | None, jobs: int) -> dict:
    """`environment()` of the runs `Workers` makes: each with its share of the threads."""
    env = environment(device)
    if jobs > 1:
        env.update(threads=max(1, torch.get_num_threads() // jobs), jobs=jobs)
    return env


@torch.no_grad()
def macs_per_image(model, task: str) -> int:
    """Multiply-adds of one forward pass of one image of `task` as the model runs it now
    (convolutions and linear layers, counted by `torch.utils.flop_counter`; a soft route
    under weight mixing also counts the mixing of the modules' weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = model.check_task(task)
    param = next(model.parameters())
    with model.evaluating(), FlopCounterMode(display=False) as counter:
        model(torch.zeros((1, *spec.input_shape), device=param.device, dtype=param.dtype), task)
    return counter.get_total_flops() // 2


def read_log(path: Path) -> list[dict]:
    """The records of a run's `log.jsonl` (none when the file is missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_fifths(records: list[dict]) -> tuple[float, float] | None:
    """Mean logged training loss over the fourth and over the last fifth of a run's steps:
    a converged run has the two about equal."""
    rec = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not rec:
        return None
    end = rec[-1][0]
    fourth = [loss for step, loss in rec if 0.6 * end < step <= 0.8 * end]
    last = [loss for step, loss in rec if step > 0.8 * end]
    if not fourth or not last:
        return None
    return sum(fourth) / len(fourth), sum(last) / len(last)
