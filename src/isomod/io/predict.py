"""Predictions of a trained model on image files: `isomod predict`.

Each image is read with PIL, converted to the task's channel count (grayscale or RGB) and,
when its size differs, resized to the height and width the task was trained at (the
command says how many were); the model gives class probabilities, named by the task's
class names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from isomod.data.tasks import IMAGE_SUFFIXES
from isomod.errors import IsomodError
from isomod.core.network import to_float

BATCH = 256


def image_files(inputs: list[str]) -> list[Path]:
    """The image files named, and those inside named folders (sorted); one line for a miss."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise IsomodError(f"{path}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise IsomodError(f"{path}: no such image file or folder")
    return files


def read_image(path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """`path` as uint8 `(C, H, W)` of the task's `shape`, and whether it had to be resized."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            resized = im.size != (width, height)
            if resized:
                im = im.resize((width, height), Image.BILINEAR)
            arr = np.array(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise IsomodError(f"{path}: not a readable image ({type(exc).__name__})") from None
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), resized


@torch.no_grad()
def predict_files(model, task: str | list[str], inputs: list[str], top: int = 3) -> tuple[list[dict], int]:
    """The `top` classes and probabilities of every image in `inputs` under `task` (or, given
    one task per input, each input's images under its task, several tasks served in one
    batch), and how many images were resized:
    `[{"file": ..., "task": ..., "top": [{"class": ..., "index": ..., "p": ...}]}]`."""
    tasks = [task] * len(inputs) if isinstance(task, str) else list(task)
    if len(tasks) != len(inputs):
        raise IsomodError(f"give one task per image or folder: {len(tasks)} tasks for {len(inputs)} inputs")
    specs = {t: model.check_task(t) for t in tasks}
    shapes = {tuple(s.input_shape) for s in specs.values()}
    if len(shapes) > 1:
        raise IsomodError(f"the tasks take images of different shapes ({', '.join(map(str, sorted(shapes)))}); "
                          "predict them in separate calls")
    shape = shapes.pop()
    jobs = [(f, t) for item, t in zip(inputs, tasks) for f in image_files([item])]
    device = next(model.parameters()).device
    out, resized = [], 0
    with model.evaluating():
        for i in range(0, len(jobs), BATCH):
            part = jobs[i : i + BATCH]
            images = [read_image(f, shape) for f, _ in part]
            resized += sum(r for _, r in images)
            x = to_float(torch.from_numpy(np.stack([a for a, _ in images])).to(device))  # (B, C, H, W)
            names = [t for _, t in part]
            logits = model(x, names[0]) if len(set(names)) == 1 else model(x, names)  # (B, K) or (B, K_max)
            probs = torch.softmax(logits, -1).cpu()
            for (f, t), row in zip(part, probs):
                classes = list(specs[t].class_names) or [str(k) for k in range(specs[t].num_classes)]
                p, idx = row[: len(classes)].topk(min(top, len(classes)))
                out.append({"file": str(f), "task": t, "top": [{"class": classes[k], "index": k, "p": round(v, 5)}
                                                              for v, k in zip(p.tolist(), idx.tolist())]})
    return out, resized
