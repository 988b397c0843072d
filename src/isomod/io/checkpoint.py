"""Checkpoints: a folder with `config.json` (shape, tasks, routes) and `model.safetensors`,
plus `trainer.pt` (optimiser, step, random states) when written by a training run.

A checkpoint folder is written next to its destination and renamed into place, so a
crash or a failed run never leaves a half-written checkpoint and never destroys the
previous one. Replacing a checkpoint takes two renames (the old one aside, the new one
in); a process killed between them leaves the previous checkpoint in `.NAME.old-*`, from
where the next reader or writer puts it back. `trainer.pt` holds only tensors and plain
values and is read with `weights_only=True`: a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from isomod.core.baselines import IndependentNets, PlainResNet
from isomod.files import usual_mode
from isomod.errors import CheckpointError, IsomodError
from isomod.core.network import ModelConfig, ModularNet, TaskModel

FORMAT = "isomod-checkpoint"
VERSION = 1
MODEL_KINDS: dict[str, type[TaskModel]] = {
    "ModularNet": ModularNet,
    "PlainResNet": PlainResNet,
    "IndependentNets": IndependentNets,
}
CONFIG, WEIGHTS, TRAINER = "config.json", "model.safetensors", "trainer.pt"
TRAINER_KEYS = ("step", "optimizer", "batches", "sampler", "aug", "torch_rng")


def save_checkpoint(model: TaskModel, path: str | Path, trainer_state: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write `model` (and optionally the trainer's state) to the folder `path`, atomically.

    Args:
        model: a ModularNet or a baseline.
        path: destination folder; an existing checkpoint there is replaced only once the
            new one is complete.
        trainer_state: the trainer's state as tensors and plain values (what
            `torch.load(..., weights_only=True)` reads back), needed to resume training.
        extra: JSON-serialisable notes stored in `config.json` under `extra`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    usual_mode(tmp, 0o777)
    try:
        config = {"format": FORMAT, "version": VERSION, "kind": type(model).__name__,
                  **model.to_config(), "extra": extra or {}}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
        _replace_dir(tmp, path)
    except (OSError, SafetensorError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        kept = "the last good checkpoint is kept" if checkpoint_exists(path) else "no checkpoint was written before"
        raise CheckpointError(f"cannot write the checkpoint {path} ({reason}); {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(new: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
    os.rmdir(old)
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def _leftovers(path: Path, kind: str) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.{kind}-*"), key=lambda p: p.stat().st_mtime)


def recover(path: str | Path) -> None:
    """Finish an interrupted replacement and clean what failed writes left behind.

    A missing checkpoint with a `.NAME.old-*` copy beside it was killed between the two
    renames: the newest complete old copy goes back into place. Stale `.NAME.tmp-*` folders
    (a write that never finished) and old copies are removed. A process writing the same
    checkpoint at the same moment is not supported (one writer per run folder)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    olds = [p for p in _leftovers(path, "old") if (p / CONFIG).is_file() and (p / WEIGHTS).is_file()]
    if not path.exists() and olds:
        os.replace(olds.pop(), path)
    for stale in _leftovers(path, "old") + _leftovers(path, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoint_exists(path: str | Path) -> bool:
    """Whether a checkpoint is at `path` (after recovering an interrupted replacement)."""
    recover(path)
    return (Path(path) / CONFIG).is_file()


def read_config(path: str | Path) -> dict:
    """The checked `config.json` of a checkpoint folder."""
    path = Path(path)
    file = path / CONFIG
    if not checkpoint_exists(path):
        raise CheckpointError(f"{path}: not a checkpoint folder (no {CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not an isomod checkpoint config")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{file}: checkpoint version {config.get('version')}; this isomod reads {VERSION}")
    if config.get("kind") not in MODEL_KINDS:
        raise CheckpointError(f"{file}: unknown model kind {config.get('kind')!r}; known: {', '.join(MODEL_KINDS)}")
    return config


def load_weights(model: TaskModel, path: str | Path) -> None:
    """Load a checkpoint's weights into a model of exactly the same shape."""
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS}")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: corrupt weights file ({exc})") from None
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise CheckpointError(f"{file}: weights do not match the model's config: {detail}") from None


PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"  # pools shipped with the package


def shipped() -> list[str]:
    """The names of the pretrained pools the package ships (`pretrained:NAME`)."""
    return sorted(p.name for p in PRETRAINED.iterdir() if (p / CONFIG).is_file()) if PRETRAINED.is_dir() else []


def resolve(path: str | Path) -> Path:
    """A checkpoint folder: `pretrained:NAME` names a pool shipped with the package."""
    text = str(path)
    if not text.startswith("pretrained:"):
        return Path(path)
    name = text.removeprefix("pretrained:")
    if name not in shipped():
        raise IsomodError(f"no pretrained pool {name!r}; shipped: {', '.join(shipped()) or 'none'}")
    return PRETRAINED / name


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> TaskModel:
    """Rebuild a model from `config.json` and load its weights; the files are only read.
    `pretrained:NAME` loads a pool shipped with the package."""
    path = resolve(path)
    config = read_config(path)
    try:
        model = MODEL_KINDS[config["kind"]].from_config(config)
    except (KeyError, TypeError, ValueError, AttributeError, IsomodError) as exc:
        raise CheckpointError(f"{Path(path) / CONFIG}: cannot build the model ({exc})") from None
    model.to(device)
    load_weights(model, path)
    return model


def check_compatible(model: TaskModel, path: str | Path) -> None:
    """Raise unless the checkpoint at `path` has the same kind, shape and tasks as `model`
    (a shape option the checkpoint predates counts as its default)."""
    config = read_config(path)
    mine = json.loads(json.dumps({"kind": type(model).__name__, **model.to_config()}))
    if isinstance(config.get("model"), dict):
        defaults = json.loads(json.dumps(asdict(ModelConfig())))
        config["model"] = {**defaults, **config["model"]}
    for key in ("kind", "model", "tasks"):
        if config.get(key) != mine.get(key):
            raise CheckpointError(
                f"{path}: checkpoint {key} differs from this run's ({_diff(config.get(key), mine.get(key))})"
            )


def _diff(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return ", ".join(f"{k}: {a.get(k)!r} in checkpoint vs {b.get(k)!r}" for k in keys[:3])
    if isinstance(a, list) and isinstance(b, list):
        names_a = [t.get("name") for t in a if isinstance(t, dict)]
        names_b = [t.get("name") for t in b if isinstance(t, dict)]
        if names_a != names_b:
            return f"tasks {names_a} in checkpoint vs {names_b}"
    return f"{a!r} in checkpoint vs {b!r}"


def load_trainer_state(path: str | Path) -> dict | None:
    """The trainer state of a checkpoint (None when it has none). Only tensors and plain
    values are read (`weights_only=True`); anything else is refused, never executed."""
    file = Path(path) / TRAINER
    if not file.is_file():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file}: refused: not a trainer state of tensors and plain values (corrupt, or "
                              "holding other objects; isomod never runs code from a checkpoint)") from None
    except Exception as exc:
        raise CheckpointError(f"{file}: corrupt trainer state ({type(exc).__name__})") from None
    missing = [k for k in TRAINER_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file}: not an isomod trainer state (missing {', '.join(missing)})")
    return state
