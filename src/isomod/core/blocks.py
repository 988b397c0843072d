"""The blocks a pool is made of, each written once and callable with given weights.

- the residual convolution block (`block="conv"`): `x + conv(relu(norm2(conv(relu(norm1(x))))))`
  on feature maps `(B, C, H, W)`;
- the pre-norm transformer block (`block="transformer"`): `h = x + attn(norm1(x))`, then
  `h + mlp(norm2(h))` on tokens `(B, T, C)`.

A module of the pool owns its weights and, optionally, the affine parameters of its two
norms. Normalisation belongs to the route step that runs the module (see `network.py`), so
a block is a pure function of its input, its weights (a module's, or a mixture of modules')
and two normalisation callables: `Module.run(x, params, norm1, norm2)`.

Everything that differs between block types is one `BlockKind` record (`KINDS`): the module
class, the stem, the norm, how features are pooled, what a config must satisfy. The rest of
the package asks the record and never branches on a block's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from isomod.distributed import BatchNorm
from isomod.errors import IsomodError


Norm = Callable[[torch.Tensor], torch.Tensor]


def residual_block(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, norm1: Norm, norm2: Norm,
                   groups: int = 1) -> torch.Tensor:
    """Pre-activation residual block `x + conv(relu(norm2(conv(relu(norm1(x))))))`.

    Args:
        x: input `(B, C, H, W)`.
        w1, w2: convolution weights `(C, C / groups, k, k)`, `k` odd.
        norm1, norm2: normalisation layers (or callables) over `C` channels.
        groups: independent channel groups (several tasks' blocks side by side,
            `isomod.training.grouped`).
    """
    return x + residual_branch(F.relu(norm1(x)), w1, w2, norm2, groups)


def residual_branch(a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, norm2: Norm, groups: int = 1) -> torch.Tensor:
    """`f(x)` of the block from its pre-activated input `a = relu(norm1(x))`."""
    pad = w1.shape[-1] // 2
    h = F.conv2d(a, w1, padding=pad, groups=groups)  # (B, C, H, W)
    return F.conv2d(F.relu(norm2(h)), w2, padding=pad, groups=groups)  # (B, C, H, W)


AFFINE = ("g1", "b1", "g2", "b2")  # a module's own scale and shift of its two norms, when it owns them


class PoolModule(nn.Module):
    """What every module of a pool has: its weights by name (`WEIGHTS`), optionally the scale
    and shift of its two norms, and `params()` for the block's `run`."""

    WEIGHTS: tuple[str, ...] = ()

    def own_affine(self, channels: int) -> None:
        # Scale and shift of the norm before each half of the block; the step supplies the statistics.
        self.g1, self.g2 = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.ones(channels))
        self.b1, self.b2 = nn.Parameter(torch.zeros(channels)), nn.Parameter(torch.zeros(channels))

    @property
    def norm_affine(self) -> bool:
        """Whether this module owns its norms' affine parameters (`g1, b1, g2, b2`)."""
        return hasattr(self, "g1")

    def params(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.WEIGHTS + (AFFINE if self.norm_affine else ())}


class ResidualModule(PoolModule):
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
            self.own_affine(channels)

    WEIGHTS = ("w1", "w2")

    @staticmethod
    def run(x: torch.Tensor, p: dict[str, torch.Tensor], norm1: Norm, norm2: Norm, groups: int = 1) -> torch.Tensor:
        """The block on `x` with weights `p` and the step's norms (statistics-only ones when
        `p` holds the affine parameters), in `groups` independent channel groups."""
        if "g1" in p:
            norm1, norm2 = with_affine(norm1, p["g1"], p["b1"]), with_affine(norm2, p["g2"], p["b2"])
        return residual_block(x, p["w1"], p["w2"], norm1, norm2, groups)

    def forward(self, x: torch.Tensor, norm1: Norm, norm2: Norm) -> torch.Tensor:
        """The block on `x` with the step's norms (statistics-only ones when the module
        owns the affine parameters)."""
        return self.run(x, self.params(), norm1, norm2)


def with_affine(norm: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, bias: torch.Tensor
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A statistics-only `norm` followed by a per-channel scale `weight` and shift `bias` `(C,)`
    (channels on dimension 1 of feature maps, on the last dimension of tokens)."""
    def norm_then_affine(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return norm(x) * weight[None, :, None, None] + bias[None, :, None, None]
        return norm(x) * weight + bias
    return norm_then_affine


def attention(x: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor, proj_w: torch.Tensor,
              proj_b: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention of tokens `x` `(B, T, C)` with `heads` heads."""
    b, t, c = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).view(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
    # softmax(q k^T / sqrt(d)) v, fused where the device has a kernel: (B, H, T, T) never stored
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, d)
    return F.linear(out.transpose(1, 2).reshape(b, t, c), proj_w, proj_b)  # (B, T, C)


def transformer_block(x: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor, proj_w: torch.Tensor,
                      proj_b: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor,
                      fc2_b: torch.Tensor, norm1: Norm, norm2: Norm, heads: int) -> torch.Tensor:
    """Pre-norm transformer block on tokens `(B, T, C)`: `h = x + attn(norm1(x))`, then
    `h + fc2(gelu(fc1(norm2(h))))`."""
    h = x + attention(norm1(x), qkv_w, qkv_b, proj_w, proj_b, heads)  # (B, T, C)
    return h + F.linear(F.gelu(F.linear(norm2(h), fc1_w, fc1_b)), fc2_w, fc2_b)


class TransformerModule(PoolModule):
    """One module of a transformer pool: the attention and MLP weights of a pre-norm block,
    and optionally the affine parameters of its two layer norms.

    Args:
        channels: token width `C`.
        heads: attention heads (`C` divisible by them).
        mlp_ratio: the MLP's hidden width as a multiple of `C`.
        residual_scale: the output projections start at this fraction of their initial
            scale, so a deep stack starts close to the identity.
        norm_affine: also own the scale and shift of both norms (`g1, b1, g2, b2`, each `(C,)`).
    """

    WEIGHTS = ("qkv_w", "qkv_b", "proj_w", "proj_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b")

    def __init__(self, channels: int, heads: int = 4, mlp_ratio: int = 2, residual_scale: float = 0.5,
                 norm_affine: bool = False):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        hidden = mlp_ratio * channels
        self.qkv_w = nn.Parameter(torch.randn(3 * channels, channels) * channels ** -0.5)
        self.qkv_b = nn.Parameter(torch.zeros(3 * channels))
        self.proj_w = nn.Parameter(torch.randn(channels, channels) * channels ** -0.5 * residual_scale)
        self.proj_b = nn.Parameter(torch.zeros(channels))
        self.fc1_w = nn.Parameter(torch.randn(hidden, channels) * math.sqrt(2.0 / channels))
        self.fc1_b = nn.Parameter(torch.zeros(hidden))
        self.fc2_w = nn.Parameter(torch.randn(channels, hidden) * hidden ** -0.5 * residual_scale)
        self.fc2_b = nn.Parameter(torch.zeros(channels))
        if norm_affine:
            self.own_affine(channels)

    @staticmethod
    def run(x: torch.Tensor, p: dict[str, torch.Tensor], norm1: Norm, norm2: Norm, heads: int = 4) -> torch.Tensor:
        if "g1" in p:
            norm1, norm2 = with_affine(norm1, p["g1"], p["b1"]), with_affine(norm2, p["g2"], p["b2"])
        return transformer_block(x, *(p[n] for n in TransformerModule.WEIGHTS), norm1, norm2, heads)

    def forward(self, x: torch.Tensor, norm1: Norm, norm2: Norm) -> torch.Tensor:
        return self.run(x, self.params(), norm1, norm2, self.heads)


class PatchEmbed(nn.Module):
    """A transformer's stem: `patch` x `patch` patches projected to `channels`, plus a learned
    position embedding: images `(B, C_in, S, S)` -> tokens `(B, (S / patch)^2, channels)`."""

    def __init__(self, in_channels: int, channels: int, patch: int, image_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, channels, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, channels) * 0.02)

    @property
    def weight(self) -> nn.Parameter:
        """The patch projection's weight (where the stem's device and dtype are read)."""
        return self.proj.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, C)


def conv_stem(in_channels: int, channels: int, stride: int, image_size: int) -> nn.Module:
    """A 3x3 convolution for strides 1 and 2, a patchify convolution for larger strides."""
    if stride <= 2:
        return nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1)
    return nn.Conv2d(in_channels, channels, stride, stride=stride)


def check_transformer(config) -> None:
    if config.channels % config.heads:
        raise IsomodError(f"a transformer's channels ({config.channels}) must be divisible by its heads "
                          f"({config.heads})")
    if config.image_size % config.stem_stride:
        raise IsomodError(f"a transformer's image size ({config.image_size}) must be a multiple of its patch "
                          f"size (stem_stride {config.stem_stride})")


@dataclass(frozen=True)
class BlockKind:
    """What one block type brings.

    Args:
        name: `ModelConfig.block`.
        module: the pool's module class (`WEIGHTS`, `run`).
        build: a new module from the pool's shape `(channels, kernel_size, heads, mlp_ratio,
            residual_scale, norm_affine)`.
        run: the block on `x` with given weights: `run(x, params, norm1, norm2, heads)`.
        stem: the stem `(in_channels, channels, stride, image_size) -> nn.Module`.
        norm: a norm over `channels` `(channels, affine) -> nn.Module`.
        features: the pooled features `(B, C)` from the final norm's output.
        check: refuses a config this kind cannot build, in one line.
        fixed_size: whether the stem fixes the image size (a position embedding).
        shares_first_norm: whether output mixing may run the step's first norm once for
            every module (convolution blocks), rather than every module whole.
        groups_tasks: whether a step's tasks can run side by side as channel groups
            (`isomod.training.grouped`: grouped convolutions, norms per channel).
    """

    name: str
    module: type
    build: Callable[..., nn.Module]
    run: Callable[..., torch.Tensor]
    stem: Callable[[int, int, int, int], nn.Module]
    norm: Callable[[int, bool], nn.Module]
    features: Callable[[torch.Tensor], torch.Tensor]
    check: Callable[[object], None] = lambda config: None
    fixed_size: bool = False
    shares_first_norm: bool = False
    groups_tasks: bool = False


KINDS: dict[str, BlockKind] = {
    "conv": BlockKind(
        "conv", ResidualModule,
        build=lambda c, k, heads, mlp, scale, affine: ResidualModule(c, k, scale, affine),
        run=lambda x, p, n1, n2, heads: ResidualModule.run(x, p, n1, n2),
        stem=conv_stem, norm=lambda c, affine: BatchNorm(c, affine=affine),
        features=lambda h: F.relu(h).mean(dim=(2, 3)),  # (B, C, H, W) -> (B, C)
        shares_first_norm=True, groups_tasks=True),
    "transformer": BlockKind(
        "transformer", TransformerModule,
        build=lambda c, k, heads, mlp, scale, affine: TransformerModule(c, heads, mlp, scale, affine),
        run=TransformerModule.run, stem=PatchEmbed,
        norm=lambda c, affine: nn.LayerNorm(c, elementwise_affine=affine),
        features=lambda h: h.mean(dim=1),  # (B, T, C) -> (B, C)
        check=check_transformer, fixed_size=True),
}
BLOCKS = tuple(KINDS)
