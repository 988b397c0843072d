"""`mnistc`: corrupted MNIST target domains in the style of MNIST-C (Mu & Gilmer, 2019).

Each corruption is applied to the `digits5/mnist` images (32x32 RGB, same labels and the
same train/test split), so a model trained on clean `digits5/mnist` never saw a target
test image, clean or corrupted. Where a corruption has a strength, every image draws its
own from a generator seeded by the domain and split: the domains are deterministic and
cached.

- `shot_noise`: Poisson photon noise, `poisson(8 x) / 8` (stronger than MNIST-C's
  `poisson(60 x) / 60`, which barely shows on these bold digits).
- `impulse_noise`: salt-and-pepper noise on 10-20% of the pixels.
- `shear`: a horizontal shear by a factor of 0.4-0.8, either way.
- `scale`: the digit shrunk to 45-65% of its size, centred.
- `rotate`: a rotation by 30-60 degrees, either way.
- `fog`: a smooth random haze added to the image, contrast lowered.
- `motion_blur`: the image averaged along a line of 5-9 pixels at a random angle.

`bench adapt` reads the labels of one corruption, `motion_blur`, to choose its methods'
learning rates (`DEVELOPMENT`), and never reports it.

They share the `digits5` label space, so a model trained on `digits5` domains adapts to
them; they are targets only, never sources of `bench adapt`.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from isomod.data import digits5
from isomod.data.cache import cached_npz

CORRUPTIONS = ("shot_noise", "impulse_noise", "shear", "scale", "rotate", "fog", "motion_blur")
DEVELOPMENT = ("motion_blur",)  # targets whose labels choose hyper-parameters; never reported
VERSION = "v1"


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, either_way: bool = False) -> torch.Tensor:
    v = lo + (hi - lo) * torch.rand(n, generator=g)
    if either_way:
        v = v * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return v


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample `(B, H, W)` images through the affine maps `theta` `(B, 2, 3)` (output to
    input coordinates in [-1, 1]); outside the image is black."""
    grid = F.affine_grid(theta, (len(x), 1, *x.shape[1:]), align_corners=False)
    return F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def shot_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.poisson(x * 8.0, generator=g) / 8.0


def impulse_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    amount = _uniform(len(x), 0.10, 0.20, g)[:, None, None]
    u = torch.rand(x.shape, generator=g)
    salt = torch.rand(x.shape, generator=g) < 0.5
    hit = u < amount
    return torch.where(hit & salt, 1.0, torch.where(hit, 0.0, x))


def shear(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    s = _uniform(len(x), 0.4, 0.8, g, either_way=True)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 1] = 1.0, s, 1.0
    return _affine(x, theta)


def scale(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    z = _uniform(len(x), 0.45, 0.65, g)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / z, 1 / z
    return _affine(x, theta)


def rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    a = _uniform(len(x), math.radians(30), math.radians(60), g, either_way=True)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
    theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    return _affine(x, theta)


def fog(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, h, w = x.shape
    coarse = torch.rand(n, 1, 4, 4, generator=g)  # a smooth haze: coarse noise, upsampled
    haze = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[:, 0].clamp(0, 1)
    strength = _uniform(n, 0.4, 0.7, g)[:, None, None]
    return (x * (1 - 0.5 * strength) + strength * haze).clamp(0, 1)


def motion_blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = len(x)
    length = torch.randint(5, 10, (n,), generator=g)
    angle = _uniform(n, 0.0, math.pi, g)
    offsets = torch.arange(9, dtype=torch.float32) - 4  # (9,) positions along the line
    used = (offsets.abs()[None] <= (length[:, None] - 1) / 2).float()  # (B, 9) the taps each image uses
    out = torch.zeros_like(x)
    for k, t in enumerate(offsets):  # each tap: the image shifted by t pixels along the angle
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = 1.0, 1.0
        theta[:, 0, 2] = 2 * t * angle.cos() / x.shape[2]
        theta[:, 1, 2] = 2 * t * angle.sin() / x.shape[1]
        out += used[:, k, None, None] * _affine(x, theta)
    return out / used.sum(1)[:, None, None]


MAKERS = {"shot_noise": shot_noise, "impulse_noise": impulse_noise, "shear": shear, "scale": scale,
          "rotate": rotate, "fog": fog,
          "motion_blur": motion_blur}


def corrupt(name: str, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Float grey images `(B, H, W)` in [0, 1], corrupted by `name`, in [0, 1]."""
    return MAKERS[name](x, g).clamp(0, 1)


def generate(name: str) -> dict[str, np.ndarray]:
    """One corruption's `x_train, y_train, x_test, y_test` (uint8 `(N, 3, 32, 32)`), cached."""

    def make() -> dict[str, np.ndarray]:
        clean = digits5.generate("mnist")
        arrays = {}
        for split in ("train", "test"):
            g = torch.Generator().manual_seed(zlib.crc32(f"mnistc-{name}-{split}".encode()))
            x = torch.from_numpy(clean[f"x_{split}"][:, 0]).float() / 255.0  # the grey digit (all channels equal)
            x = corrupt(name, x, g)
            arrays[f"x_{split}"] = (x[:, None].expand(-1, 3, -1, -1) * 255).round().to(torch.uint8).numpy()
            arrays[f"y_{split}"] = clean[f"y_{split}"]
        return arrays

    return cached_npz(f"mnistc-{VERSION}-{digits5.VERSION}-{name}.npz", make)
