"""The residual block, written once and callable with given weights.

A module of the pool owns only its convolution weights. Normalisation belongs to the
route step that runs the module (see `network.py`), so the block is a pure function of
its input, two weight tensors and two normalisation layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def residual_block(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    norm1: nn.Module,
    norm2: nn.Module,
) -> torch.Tensor:
    """Pre-activation residual block `x + conv(relu(norm2(conv(relu(norm1(x))))))`.

    Args:
        x: input `(B, C, H, W)`.
        w1, w2: convolution weights `(C, C, k, k)`, `k` odd.
        norm1, norm2: normalisation layers over `C` channels.
    """
    return x + residual_branch(F.relu(norm1(x)), w1, w2, norm2)


def residual_branch(a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, norm2: nn.Module) -> torch.Tensor:
    """`f(x)` of the block from its pre-activated input `a = relu(norm1(x))`."""
    pad = w1.shape[-1] // 2
    h = F.conv2d(a, w1, padding=pad)  # (B, C, H, W)
    return F.conv2d(F.relu(norm2(h)), w2, padding=pad)  # (B, C, H, W)


class ResidualModule(nn.Module):
    """One module of the pool: the two convolution weights of a residual block.

    Args:
        channels: width `C` of the block's input and output.
        kernel_size: odd spatial size of both convolutions.
        residual_scale: the second convolution starts at this fraction of its He
            initialisation, so a deep stack starts close to the identity.
    """

    def __init__(self, channels: int, kernel_size: int = 3, residual_scale: float = 0.5):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        shape = (channels, channels, kernel_size, kernel_size)
        std = math.sqrt(2.0 / (channels * kernel_size * kernel_size))
        self.w1 = nn.Parameter(torch.randn(shape) * std)
        self.w2 = nn.Parameter(torch.randn(shape) * std * residual_scale)

    def forward(self, x: torch.Tensor, norm1: nn.Module, norm2: nn.Module) -> torch.Tensor:
        return residual_block(x, self.w1, self.w2, norm1, norm2)
