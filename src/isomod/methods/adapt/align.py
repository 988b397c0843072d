"""Objectives that align a target domain's features with labelled source domains' (the
`with_sources` setting of `isomod.methods.adapt`), run by the one `Trainer`.

`SourceAlignment` makes the target's pooled features (what the head reads) look like the
sources', by matching moments (`moment`: per-feature means and second moments, as M3SDA) or
by fooling a domain discriminator behind a gradient reversal layer (`adversarial`, DANN's
game; the objective owns the discriminator). Two forms:

- route only (`bank` given): the sources' features are frozen, computed once; the target
  aligns to the nearest source's, and only its route trains;
- whole network (`bank` None): every step also draws labelled images of every source,
  whose cross-entropy joins the loss, and all sources are pulled together (M3SDA) or
  towards the target (DANN);
- sources training, the route aligning (`target_logits` given; the authors' setting): the
  sources' cross-entropy trains the network, while the alignment's gradient reaches the
  target's route logits alone (the sources' features held fixed in it), as their separate
  optimiser of the target's mixture weights does.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

from isomod.errors import check_choice
from isomod.training.objectives import Batch, Objective, Output

ALIGNMENTS = ("moment", "adversarial")
DISCRIMINATOR_HIDDEN = 64
# Weight of the alignment loss beside the sources' cross-entropy (m3sda, dann): chosen on
# validation images of two targets' training splits (digits5 mnist and mnistm, seed 0),
# where 0.1 beat 1.0 for both methods on both (m3sda 74.4 / 46.6 against 67.5 / 42.5).
ALIGN_WEIGHT = 0.1


def moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and second moment of features `(B, C)`."""
    return f.mean(0), f.pow(2).mean(0)


def moment_gap(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Squared distance between two feature distributions' first and second moments."""
    return 0.5 * ((a[0] - b[0]).pow(2).sum() + (a[1] - b[1]).pow(2).sum())


class _Reverse(torch.autograd.Function):
    """Identity forward; the gradient multiplied by `-scale` backward (DANN's layer)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _Reverse.apply(x, scale)


def dann_scale(progress: float) -> float:
    """DANN's ramp of the reversed gradient from 0 to 1 over training."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def domain_loss(disc: nn.Module, source: torch.Tensor, target: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """The discriminator's loss (sources labelled 0, target 1, each side weighted equally)
    on features that pass a gradient reversal layer, and its accuracy."""
    d_s, d_t = disc(reverse_gradient(source, scale)), disc(reverse_gradient(target, scale))
    loss = (F.binary_cross_entropy_with_logits(d_s, torch.zeros_like(d_s))
            + F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t)))
    acc = 0.5 * ((d_s < 0).float().mean() + (d_t > 0).float().mean())
    return loss, acc.detach()


class SourceAlignment(Objective):
    """The target's features aligned with the sources'; never reads a target label.

    Args:
        align: `moment` or `adversarial`.
        sources: the source domains' task names (whole-network form: drawn every step).
        batch_size: source images per step, split evenly over the sources (or frozen
            features drawn from `bank`).
        channels: feature width (the discriminator's input).
        bank: frozen features `(M, C)` of the nearest source (route-only form), or None.
        target_logits: the target route's logits, the only numbers the alignment may move
            while the sources train (None: the alignment's gradient goes wherever it flows).
    Metrics: `align` (the alignment loss), `ce` (the sources' cross-entropy, whole
    network), `domain_acc` (the discriminator's accuracy, adversarial).
    """

    def __init__(self, align: str, sources: list[str], batch_size: int, channels: int,
                 bank: torch.Tensor | None = None, target_logits: nn.Parameter | None = None):
        super().__init__()
        check_choice("alignment", align, ALIGNMENTS)
        self.align, self.sources, self.batch_size = align, list(sources), batch_size
        self.target_logits = [target_logits] if target_logits is not None else []  # a list: not registered here
        self.per_source = max(1, batch_size // len(self.sources))
        self.register_buffer("bank", bank, persistent=False)
        mean, second = moments(bank) if bank is not None else (None, None)
        self.register_buffer("ref_mean", mean, persistent=False)  # buffers: `.to(device)` moves them
        self.register_buffer("ref_second", second, persistent=False)
        self.disc = (nn.Sequential(nn.Linear(channels, DISCRIMINATOR_HIDDEN), nn.ReLU(),
                                   nn.Linear(DISCRIMINATOR_HIDDEN, 1)) if align == "adversarial" else None)

    def _source_features(self, model, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        if self.bank is not None:
            idx = batch.extra.indices(len(self.bank), self.batch_size).to(self.bank.device)
            return {"nearest": self.bank[idx]}, None
        feats, ce = {}, 0.0
        for s in self.sources:
            x, y = batch.extra.draw(s, self.per_source)
            f = model.forward_features(x, s)
            ce = ce + F.cross_entropy(model.forward_head(f, s), y) / len(self.sources)
            feats[s] = f
        return feats, ce

    def _moment_loss(self, ft: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        mt = moments(ft)
        if self.ref_mean is not None:
            return moment_gap(mt, (self.ref_mean, self.ref_second))
        src = [moments(f) for f in feats.values()]
        loss = sum(moment_gap(mt, m) for m in src) / len(src)
        pairs = list(combinations(src, 2))
        if pairs:  # M3SDA also pulls the sources together
            loss = loss + sum(moment_gap(a, b) for a, b in pairs) / len(pairs)
        return loss

    def forward(self, model, batch: Batch) -> Output:
        ft = model.forward_features(batch.x, batch.task)
        feats, ce = self._source_features(model, batch)
        with torch.no_grad():
            logits = model.forward_head(ft, batch.task)
        if self.target_logits:
            return self._route_aligning(ft, feats, ce, logits, batch)
        metrics = {}
        if self.align == "moment":
            align = self._moment_loss(ft, feats)
        else:
            align, metrics["domain_acc"] = domain_loss(self.disc, torch.cat(list(feats.values())), ft,
                                                       dann_scale(batch.progress))
        metrics["align"] = align.detach()
        if ce is not None:
            metrics["ce"] = ce.detach()
        return Output(align if ce is None else ce + ALIGN_WEIGHT * align, logits, metrics)

    def _route_aligning(self, ft: torch.Tensor, feats: dict, ce: torch.Tensor, logits: torch.Tensor,
                        batch: Batch) -> Output:
        """The sources' cross-entropy, the discriminator's own loss, and a term whose gradient
        is the alignment's gradient with respect to the target's route logits alone (its value
        is zero, so the logged loss stays the cross-entropy's)."""
        held = {k: v.detach() for k, v in feats.items()}
        metrics = {"ce": ce.detach()}
        if self.align == "moment":
            align, disc_loss = self._moment_loss(ft, held), 0.0
        else:
            disc_loss, metrics["domain_acc"] = domain_loss(self.disc, torch.cat(list(held.values())), ft.detach(), 1.0)
            d_t = self.disc(reverse_gradient(ft, dann_scale(batch.progress)))
            align = F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t))
        metrics["align"] = align.detach()
        (logits_param,) = self.target_logits
        (grad,) = torch.autograd.grad(align, logits_param, retain_graph=True)
        steer = (logits_param * grad).sum()
        return Output(ce + disc_loss + steer - steer.detach(), logits, metrics)
