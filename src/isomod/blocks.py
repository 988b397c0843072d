"""The residual block, written once and callable with given weights.

A module of the pool owns its convolution weights and, optionally, the affine parameters
of its two norms. Normalisation statistics always belong to the route step that runs the
module (see `network.py`), so the block is a pure function of its input, two weight
tensors and two normalisation callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


Norm = Callable[[torch.Tensor], torch.Tensor]


def residual_block(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, norm1: Norm, norm2: Norm) -> torch.Tensor:
    """Pre-activation residual block `x + conv(relu(norm2(conv(relu(norm1(x))))))`.

    Args:
        x: input `(B, C, H, W)`.
        w1, w2: convolution weights `(C, C, k, k)`, `k` odd.
        norm1, norm2: normalisation layers (or callables) over `C` channels.
    """
    return x + residual_branch(F.relu(norm1(x)), w1, w2, norm2)


def residual_branch(a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, norm2: Norm) -> torch.Tensor:
    """`f(x)` of the block from its pre-activated input `a = relu(norm1(x))`."""
    pad = w1.shape[-1] // 2
    h = F.conv2d(a, w1, padding=pad)  # (B, C, H, W)
    return F.conv2d(F.relu(norm2(h)), w2, padding=pad)  # (B, C, H, W)


class ResidualModule(nn.Module):
    """One module of the pool: the two convolution weights of a residual block, and
    optionally the affine parameters of its two norms.

    Args:
        channels: width `C` of the block's input and output.
        kernel_size: odd spatial size of both convolutions.
        residual_scale: the second convolution starts at this fraction of its He
            initialisation, so a deep stack starts close to the identity.
        norm_affine: also own the scale and shift of both norms (`g1, b1, g2, b2`, each
            `(C,)`), applied after the statistics-only norms of the step that runs it.
    """

    def __init__(self, channels: int, kernel_size: int = 3, residual_scale: float = 0.5, norm_affine: bool = False):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        shape = (channels, channels, kernel_size, kernel_size)
        std = math.sqrt(2.0 / (channels * kernel_size * kernel_size))
        self.w1 = nn.Parameter(torch.randn(shape) * std)
        self.w2 = nn.Parameter(torch.randn(shape) * std * residual_scale)
        if norm_affine:
            # Scale and shift of the norm before each convolution; the step supplies the statistics.
            self.g1, self.g2 = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.ones(channels))
            self.b1, self.b2 = nn.Parameter(torch.zeros(channels)), nn.Parameter(torch.zeros(channels))

    @property
    def norm_affine(self) -> bool:
        """Whether this module owns its norms' affine parameters (`g1, b1, g2, b2`)."""
        return hasattr(self, "g1")

    def forward(self, x: torch.Tensor, norm1: Norm, norm2: Norm) -> torch.Tensor:
        """The block on `x` with the step's norms (statistics-only ones when the module
        owns the affine parameters)."""
        if self.norm_affine:
            norm1, norm2 = with_affine(norm1, self.g1, self.b1), with_affine(norm2, self.g2, self.b2)
        return residual_block(x, self.w1, self.w2, norm1, norm2)


def with_affine(norm: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, bias: torch.Tensor
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A statistics-only `norm` followed by a per-channel scale `weight` and shift `bias` `(C,)`."""
    return lambda x: norm(x) * weight[None, :, None, None] + bias[None, :, None, None]
