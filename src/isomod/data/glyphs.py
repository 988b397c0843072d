"""`glyphs`: an Omniglot-like suite rendered from the fonts that ship with matplotlib.

One task per script. Each character is rasterised once per font face with FreeType
(matplotlib's `FT2Font`), then every sample gets its own random size, rotation, shear,
aspect, offset, stroke width, contrast and noise, applied in torch. Train and test use
disjoint font faces, so test accuracy measures generalisation to unseen writing styles.
"""

from __future__ import annotations

import math
import os
import zlib
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from isomod.data.cache import cached_npz

CANVAS = 64  # rendering resolution; samples are warped from it, then area-downsampled
EM_PIXELS = 40  # font size on the canvas
OUT = 28


def _chars(first: int, last: int, skip: tuple[int, ...] = ()) -> str:
    return "".join(chr(c) for c in range(first, last + 1) if c not in skip)


SCRIPTS: dict[str, str] = {
    "latin_upper": _chars(0x41, 0x5A),
    "latin_lower": _chars(0x61, 0x7A),
    "digits": _chars(0x30, 0x39),
    "greek": _chars(0x391, 0x3A9, skip=(0x3A2,)),
    "cyrillic": _chars(0x410, 0x42F),
    "armenian": _chars(0x531, 0x556),
    "georgian": _chars(0x10D0, 0x10F0),
    "hebrew": _chars(0x5D0, 0x5EA),
    "greek_lower": _chars(0x3B1, 0x3C9, skip=(0x3C2,)),
    "cyrillic_lower": _chars(0x430, 0x44F),
}
SUITE = ["latin_upper", "latin_lower", "digits", "greek", "cyrillic", "armenian", "georgian", "hebrew"]

# Faces only the test split sees, one per family, so every script keeps at least one
# unseen style (Hebrew exists only in the DejaVu Sans family).
TEST_FACES = ("DejaVuSans-BoldOblique", "DejaVuSansMono", "DejaVuSerif-Italic", "STIXGeneralBol", "cmss10")
# Symbol, size-variant and fallback fonts hold no text glyphs worth learning.
SKIP_PREFIXES = ("STIXSiz", "STIXNonUni", "LastResort", "cmex", "cmsy", "DejaVuSansDisplay", "DejaVuSerifDisplay")


# matplotlib is imported only when glyphs are rendered, so `import isomod` stays light.
def font_dir() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def all_faces() -> list[str]:
    names = [f[:-4] for f in os.listdir(font_dir()) if f.endswith(".ttf")]
    return sorted(n for n in names if not n.startswith(SKIP_PREFIXES))


@lru_cache(maxsize=None)
def _font(face: str):
    from matplotlib.ft2font import FT2Font

    return FT2Font(os.path.join(font_dir(), face + ".ttf"))


def render(face: str, char: str) -> np.ndarray | None:
    """The glyph centred on a `(CANVAS, CANVAS)` float canvas in [0, 1], or None when
    the face has no such glyph (missing index or no ink: an empty box never passes)."""
    from matplotlib.ft2font import LoadFlags

    font = _font(face)
    if font.get_char_index(ord(char)) == 0:
        return None
    font.set_size(EM_PIXELS, 72)
    font.set_text(char, 0.0, flags=LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    img = np.asarray(font.get_image(), dtype=np.float32) / 255.0
    ys, xs = np.nonzero(img > 0.05)
    if len(ys) < 4:
        return None
    img = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = img.shape
    if max(h, w) > CANVAS - 4:  # rare very wide glyphs: shrink to fit the canvas
        scale = (CANVAS - 4) / max(h, w)
        t = torch.from_numpy(img)[None, None]
        img = F.interpolate(t, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")[0, 0].numpy()
        h, w = img.shape
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    top, left = (CANVAS - h) // 2, (CANVAS - w) // 2
    canvas[top : top + h, left : left + w] = img
    return canvas


@lru_cache(maxsize=None)
def faces_for(script: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train faces, test faces) that render every character of the script."""
    chars = SCRIPTS[script]
    ok = [f for f in all_faces() if all(render(f, c) is not None for c in chars)]
    test = tuple(f for f in ok if f in TEST_FACES)
    train = tuple(f for f in ok if f not in TEST_FACES)
    return train, test


def warp(proto: torch.Tensor, g: torch.Generator, out: int = OUT, zoom: float = 1.0,
         max_angle: float = 15.0) -> torch.Tensor:
    """Random stroke width, rotation, shear, scale, aspect and offset:
    `(B, CANVAS, CANVAS)` float glyphs -> `(B, out, out)` float ink in [0, 1].

    `zoom` enlarges the glyph relative to the output (1: a 28-pixel output shows the
    whole canvas).
    """
    b = proto.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=g)

    x = proto[:, None]  # (B, 1, CANVAS, CANVAS)
    # Stroke width: erode (-1), keep (0) or dilate (1) by one canvas pixel.
    stroke = torch.randint(-1, 2, (b,), generator=g)
    thick = x.clone()
    thick[stroke > 0] = F.max_pool2d(x[stroke > 0], 3, 1, 1)
    thick[stroke < 0] = -F.max_pool2d(-x[stroke < 0], 3, 1, 1)
    # Affine map from output to canvas coordinates (grid_sample's convention).
    angle = u(-max_angle, max_angle) * math.pi / 180
    shear = u(-0.3, 0.3)
    scale = u(0.8, 1.15) * zoom
    aspect = u(0.85, 1.15)
    sx, sy = 1 / (scale * aspect), aspect / scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sx * cos
    theta[:, 0, 1] = sx * (-sin + shear * cos)
    theta[:, 1, 0] = sy * sin
    theta[:, 1, 1] = sy * (cos + shear * sin)
    theta[:, 0, 2] = u(-0.12, 0.12)
    theta[:, 1, 2] = u(-0.12, 0.12)
    grid = F.affine_grid(theta, (b, 1, 2 * out, 2 * out), align_corners=False)
    y = F.grid_sample(thick, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(y, 2)[:, 0]  # (B, out, out)


def _augment(proto: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """`warp`, then random contrast and noise: `(B, CANVAS, CANVAS)` -> uint8 `(B, OUT, OUT)`."""
    y = warp(proto, g)
    b = y.shape[0]
    ink = (0.7 + 0.3 * torch.rand(b, generator=g))[:, None, None]
    noise = (0.08 * torch.rand(b, generator=g))[:, None, None] * torch.randn(y.shape, generator=g)
    y = (y * ink + noise).clamp(0, 1)
    return (y * 255).round().to(torch.uint8)


def _split(script: str, faces: tuple[str, ...], per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    chars = SCRIPTS[script]
    protos = torch.stack([torch.from_numpy(render(f, c)) for c in chars for f in faces])  # (K*F, S, S)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(chars)).repeat_interleave(per_class)  # (K*per_class,)
    pick = labels * len(faces) + torch.randint(len(faces), (len(labels),), generator=g)
    x = _augment(protos[pick], g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm].numpy(), labels[perm].numpy()


def generate(script: str, train_per_class: int, test_per_class: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Generate (or read from the cache) one script's train and test arrays."""

    def make() -> dict[str, np.ndarray]:
        train_faces, test_faces = faces_for(script)
        base = seed * 1_000_003 + zlib.crc32(script.encode())
        x_tr, y_tr = _split(script, train_faces, train_per_class, base)
        x_te, y_te = _split(script, test_faces, test_per_class, base + 1)
        return {"x_train": x_tr[:, None], "y_train": y_tr, "x_test": x_te[:, None], "y_test": y_te}

    return cached_npz(f"glyphs-v1-{script}-{train_per_class}-{test_per_class}-s{seed}.npz", make)
