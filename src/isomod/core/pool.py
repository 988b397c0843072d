"""ModulePool: the `N` interchangeable modules a model owns (residual convolution blocks or
transformer blocks, all of one shape)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from isomod.core.blocks import AFFINE, KINDS
from isomod.errors import IsomodError

BLOCKS = tuple(KINDS)


class ModulePool(nn.Module):
    """A list of modules of one shape, with add / freeze / remove.

    Modules are kept as separate parameters (not one stacked tensor) so that freezing
    one module is `requires_grad=False` on its own tensors; `stacked()` builds the
    `(N, ...)` stacks that weight mixing needs.

    Args:
        num_modules: initial pool size `N`.
        channels: block width `C`.
        kernel_size: convolution size `k`.
        residual_scale: initial scale of each module's last layer (the second convolution,
            or the attention's and the MLP's output projections).
        norm_affine: every module also owns its norms' affine parameters.
        block: `conv` (residual convolution blocks) or `transformer` (pre-norm blocks).
        heads, mlp_ratio: attention heads and MLP width of transformer blocks.
    """

    def __init__(self, num_modules: int, channels: int, kernel_size: int = 3, residual_scale: float = 0.5,
                 norm_affine: bool = False, block: str = "conv", heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        if num_modules < 1:
            raise IsomodError(f"a pool needs at least 1 module, got {num_modules}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.residual_scale = residual_scale
        self.norm_affine = norm_affine
        self.block, self.heads, self.mlp_ratio = block, heads, mlp_ratio
        self.blocks = nn.ModuleList(self._new_module() for _ in range(num_modules))
        self._stack_cache: tuple | None = None

    def __getstate__(self) -> dict:
        # Copies and pickles never carry the stack cache (it holds autograd history).
        return {**self.__dict__, "_stack_cache": None}

    def __len__(self) -> int:
        return len(self.blocks)

    def _new_module(self) -> nn.Module:
        return self.kind.build(self.channels, self.kernel_size, self.heads, self.mlp_ratio, self.residual_scale,
                               self.norm_affine)

    @property
    def kind(self):
        """The block kind's record (`isomod.core.blocks.KINDS`)."""
        return KINDS[self.block]

    @property
    def module_class(self) -> type:
        return self.kind.module

    @property
    def param_names(self) -> tuple[str, ...]:
        """What each module owns: its weights (`w1, w2` of a convolution block), plus
        `g1, b1, g2, b2` with norm affine parameters."""
        return self.module_class.WEIGHTS + (AFFINE if self.norm_affine else ())

    def run(self, x: torch.Tensor, params: dict[str, torch.Tensor], norm1, norm2) -> torch.Tensor:
        """The pool's block on `x` with the given weights (one module's, or a mixture's)."""
        return self.kind.run(x, params, norm1, norm2, self.heads)

    def stacked(self) -> dict[str, torch.Tensor]:
        """Every module parameter stacked over the pool, by name: `w1` and `w2` `(N, C, C, k, k)`,
        and with norm affine parameters `g1, b1, g2, b2` `(N, C)`.

        The stacks are reused while no module's weights changed (tensor version counters),
        so the tasks of one training step share one copy and one autograd node: several
        tasks' forward passes cost one stack in time and memory, not one each.
        """
        names = self.param_names
        params = [getattr(b, n) for b in self.blocks for n in names]
        key = (torch.is_grad_enabled(),
               tuple((id(p), p.data_ptr(), p._version, p.dtype, p.requires_grad) for p in params))
        compiling = torch.compiler.is_compiling()
        if not compiling and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        stacks = {n: torch.stack(params[i::len(names)]) for i, n in enumerate(names)}
        if not compiling:
            self._stack_cache = (key, stacks)
        return stacks

    def _check(self, indices: Iterable[int]) -> list[int]:
        indices = list(indices)
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IsomodError(f"module index {bad[0]} out of range: the pool has modules 0..{len(self) - 1}")
        return indices

    def add(self, count: int = 1) -> list[int]:
        """Append `count` freshly initialised, trainable modules; returns their indices."""
        start = len(self)
        device = next(self.blocks[0].parameters()).device
        for _ in range(count):
            self.blocks.append(self._new_module().to(device))
        return list(range(start, start + count))

    def freeze(self, indices: Iterable[int] | None = None) -> None:
        """Stop training the given modules (all when `indices` is None)."""
        for i in self._check(range(len(self)) if indices is None else indices):
            self.blocks[i].requires_grad_(False)

    def unfreeze(self, indices: Iterable[int] | None = None) -> None:
        for i in self._check(range(len(self)) if indices is None else indices):
            self.blocks[i].requires_grad_(True)

    def frozen(self) -> list[bool]:
        return [not next(b.parameters()).requires_grad for b in self.blocks]

    def remove(self, index: int) -> None:
        """Delete module `index`; the modules after it move down by one."""
        (index,) = self._check([index])
        if len(self) == 1:
            raise IsomodError("cannot remove the last module of a pool")
        del self.blocks[index]
