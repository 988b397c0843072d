"""A task as a small file: what one task owns on a pool, alone, and the pool it belongs to.

A task folder holds `task.safetensors` (the route's logits, temperature and choice; the
task's norms, packed into three vectors: affine parameters, statistics and batch counts, in
the order of the task's own `state_dict`; its head, or its label space's shared head) and
`task.json` (the task's spec, the block kind, the route's form, how many numbers it holds,
the isomod version, and the **fingerprint** of its pool: a SHA-256 over the stem's and the
pool's weights in a fixed order, with the base checkpoint's name). It loads only onto a pool
with that fingerprint, and a file that is not what a task of that pool would hold (a missing
or extra tensor, another shape or dtype, a value that is not finite, a `task.json` that
disagrees with its tensors) is refused in one line before anything is added.

`ModularNet.save_task`, `load_task` and `pool_fingerprint` are the verbs; this module is
what they do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from isomod.core.spec import TaskSpec
from isomod.errors import IsomodError
from isomod.files import write_atomic, write_text_atomic

TENSORS, META = "task.safetensors", "task.json"
FORMAT = 1
SHARED = "shared_head."  # the tensors of a label space's head, when the task shares one


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("isomod")
    except PackageNotFoundError:
        return "unknown"


def pool_fingerprint(model) -> str:
    """SHA-256 over the stem's and the pool's tensors (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for prefix, module in (("stem", model.stem), ("pool", model.pool)):
        for name, value in sorted(module.state_dict().items()):
            t = value.detach().cpu().contiguous()
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


NORM_PARTS = {"affine": ("weight", "bias"), "stats": ("running_mean", "running_var"), "counts": ("num_batches_tracked",)}


def norm_part(key: str) -> str | None:
    """Which packed vector a branch tensor goes to (None: stored as it is)."""
    if not key.startswith("norms."):
        return None
    return next(part for part, ends in NORM_PARTS.items() if key.rsplit(".", 1)[1] in ends)


def pack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A branch's state with its many small norm tensors packed, in order, into one vector
    per part (`norms.affine`, `norms.stats`, `norms.counts`)."""
    out, parts = {}, {}
    for k, v in state.items():
        part = norm_part(k)
        if part is None:
            out[k] = v
        else:
            parts.setdefault(part, []).append(v.reshape(-1))
    out.update({f"norms.{p}": torch.cat(vs) for p, vs in parts.items()})
    return out


def unpack(packed: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The branch state `template`'s keys and shapes hold, read out of `packed`."""
    offsets, out = {}, {}
    for k, v in template.items():
        part = norm_part(k)
        if part is None:
            out[k] = packed[k]
            continue
        start = offsets.get(part, 0)
        out[k] = packed[f"norms.{part}"][start:start + v.numel()].view_as(v)
        offsets[part] = start + v.numel()
    return out


def task_tensors(model, task: str) -> dict[str, torch.Tensor]:
    """Everything `task` owns (its branch, norms packed), plus its label space's shared head."""
    spec = model.check_task(task)
    out = {f"branch.{k}": v for k, v in pack(model.branch(task).state_dict()).items()}
    if spec.label_space:
        out.update({SHARED + k: v for k, v in model.heads[spec.label_space].state_dict().items()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def save_task(model, task: str, folder: str | Path, base: str = "") -> Path:
    """Write `task` of `model` to `folder` (`task.safetensors`, `task.json`), each atomically."""
    from safetensors.torch import save

    model.require_routes("a task file")
    spec = model.check_task(task)
    tensors = task_tensors(model, task)
    route = model.route(task)
    meta = {"format": FORMAT, "task": asdict(spec), "block": model.config.block,
            "route": "discrete" if route.is_discrete else "soft", "route_modules": route.indices(),
            "numbers": sum(t.numel() for t in tensors.values() if t.is_floating_point()),
            "isomod": version(), "pool_fingerprint": pool_fingerprint(model), "base": str(base),
            "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for k, t in sorted(tensors.items())}}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / TENSORS, lambda f: f.write(save(tensors, metadata={"format": str(FORMAT)})))
    write_text_atomic(folder / META, json.dumps(meta, indent=1) + "\n")
    return folder


def read_task(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A task folder's `task.json` and tensors, read without running any of its code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (META, TENSORS):
        if not (folder / name).is_file():
            raise IsomodError(f"{folder}: not a task folder ({name} missing; `isomod transfer` and `save_task` write one)")
    try:
        meta = json.loads((folder / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IsomodError(f"{folder / META}: not JSON ({exc})") from None
    if not isinstance(meta, dict) or not all(k in meta for k in ("format", "task", "pool_fingerprint", "tensors")):
        raise IsomodError(f"{folder / META}: not a task file (needs format, task, pool_fingerprint and tensors)")
    if meta["format"] != FORMAT:
        raise IsomodError(f"{folder / META}: task file format {meta['format']!r}; this isomod reads format {FORMAT}")
    try:
        tensors = load_file(folder / TENSORS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise IsomodError(f"{folder / TENSORS}: not a safetensors file ({exc})") from None
    return meta, tensors


def check_task_file(model, folder: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> TaskSpec:
    """Refuse, in one line, a task file that does not belong on `model` as it stands; its spec."""
    mine, theirs = pool_fingerprint(model), str(meta["pool_fingerprint"])
    if theirs != mine:
        base = f" (saved from {meta['base']})" if meta.get("base") else ""
        raise IsomodError(f"{folder}: this task belongs to the pool {theirs[:16]}{base}; this model's pool is "
                          f"{mine[:16]}: load it onto the checkpoint it was learned on")
    try:
        spec = TaskSpec(**{**meta["task"], "input_shape": tuple(meta["task"]["input_shape"])})
    except (TypeError, KeyError, ValueError) as exc:
        raise IsomodError(f"{folder / META}: its task is not a task spec ({exc})") from None
    if spec.name in model.specs:
        raise IsomodError(f"{folder}: this model already has a task {spec.name!r}; remove it first")
    model.check_spec(spec, model.config)
    expected = {f"branch.{k}": v for k, v in pack(model.new_branch(spec).state_dict()).items()}
    if spec.label_space:
        head = model.heads[spec.label_space] if spec.label_space in model.heads else \
            torch.nn.Linear(model.config.channels, spec.num_classes)
        expected.update({SHARED + k: v for k, v in head.state_dict().items()})
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise IsomodError(f"{folder / TENSORS}: not the tensors a task of this pool holds (missing: "
                          f"{', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(extra[:4]) or 'none'})")
    for k, want in expected.items():
        got = tensors[k]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise IsomodError(f"{folder / TENSORS}: {k} is {got.dtype} {tuple(got.shape)}; a task of this pool holds "
                              f"{want.dtype} {tuple(want.shape)}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise IsomodError(f"{folder / TENSORS}: {k} holds values that are not finite (NaN or infinity)")
        declared = meta["tensors"].get(k, {}) if isinstance(meta["tensors"], dict) else {}
        if declared.get("shape") != list(got.shape):
            raise IsomodError(f"{folder / META}: says {k} has shape {declared.get('shape')}; the tensor has "
                              f"{list(got.shape)}")
    return spec


def load_task(model, folder: str | Path) -> str:
    """Add the task saved in `folder` to `model`, after every check; its name. No other task's
    outputs change, and a refused file adds nothing."""
    model.require_routes("a task file")
    folder = Path(folder)
    meta, tensors = read_task(folder)
    spec = check_task_file(model, folder, meta, tensors)
    shared = {k.removeprefix(SHARED): v for k, v in tensors.items() if k.startswith(SHARED)}
    existing = model.heads[spec.label_space] if spec.label_space and spec.label_space in model.heads else None
    if existing is not None and not all(torch.equal(existing.state_dict()[k].cpu(), v) for k, v in shared.items()):
        raise IsomodError(f"{folder}: the task's head for label space {spec.label_space!r} differs from this model's "
                          "(the domain was learned with another head)")
    branch = model.add_task(spec)
    branch.train(model.training)  # in the model's mode, as if it had always been there
    device = model.stem.weight.device
    packed = {k.removeprefix("branch."): v for k, v in tensors.items() if k.startswith("branch.")}
    branch.load_state_dict({k: v.to(device) for k, v in unpack(packed, branch.state_dict()).items()})
    if existing is None and shared:
        model.heads[spec.label_space].load_state_dict({k: v.to(device) for k, v in shared.items()})
    return spec.name
