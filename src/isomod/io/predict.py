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
def predict_files(model, task: str, inputs: list[str], top: int = 3) -> tuple[list[dict], int]:
    """The `top` classes and probabilities of every image in `inputs` under `task`, and how
    many images were resized: `[{"file": ..., "top": [{"class": ..., "index": ..., "p": ...}]}]`."""
    spec = model.check_task(task)
    files = image_files(inputs)
    names = list(spec.class_names) or [str(i) for i in range(spec.num_classes)]
    device = next(model.parameters()).device
    out, resized = [], 0
    with model.evaluating():
        for i in range(0, len(files), BATCH):
            part = files[i : i + BATCH]
            images = [read_image(f, tuple(spec.input_shape)) for f in part]
            resized += sum(r for _, r in images)
            x = torch.from_numpy(np.stack([a for a, _ in images]))  # (B, C, H, W) uint8
            probs = torch.softmax(model(to_float(x.to(device)), task), -1).cpu()  # (B, K)
            p, idx = probs.topk(min(top, len(names)), dim=1)
            for f, ps, ks in zip(part, p.tolist(), idx.tolist()):
                out.append({"file": str(f), "top": [{"class": names[k], "index": k, "p": round(v, 5)}
                                                    for v, k in zip(ps, ks)]})
    return out, resized
