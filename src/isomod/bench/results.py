"""A bench's results: one measured number a `Row`, the `results.json` file they live in
(`Results`: saved atomically, resumed when the configuration is the same, each sitting's
environment recorded), and where a result was computed (`environment`)."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from isomod.errors import IsomodError
from isomod.files import write_atomic

ROW_KEYS = ("method", "task", "metric", "value")
MIGRATIONS: dict[str, Callable[[dict], dict]] = {}  # bench name -> migrate(results) (`Bench.migrate`)


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
                if here is not None and here != self.sittings()[-1]["environment"]:
                    if self.rows:
                        self._new_sitting = here
                    else:  # a sitting that made no row: the rows to come are this one's
                        self.data["environment"] = here
                        self.data.pop("sittings", None)

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
    migrate = MIGRATIONS.get(data["bench"])
    return migrate(data) if migrate else data


def renamed(value, names: dict[str, str]):
    """`value` with the old names of `names` replaced: a name, or each item of a list."""
    if isinstance(value, list):
        return [names.get(v, v) if isinstance(v, str) else v for v in value]
    return names.get(value, value) if isinstance(value, str) else value


def job_environment(device: str | torch.device | None, jobs: int) -> dict:
    """`environment()` of the runs `Workers` makes: each with its share of the threads."""
    env = environment(device)
    if jobs > 1:
        env.update(threads=max(1, torch.get_num_threads() // jobs), jobs=jobs)
    return env
