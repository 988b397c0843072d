"""One batch, many tasks: `net(x, ["a", "b", ...])`, one task name per image.

Every image still runs the model's `L` steps. At each step the images are grouped by the
module their task's route runs there (discrete routes: images of several tasks share one
convolution) or by task (soft routes: each task's mixture of modules), and each image is
normalised with its own (task, step) norm, applied as a per-image scale and shift (eval
mode: a norm is then a fixed affine map per channel). The logits are `(B, K_max)`, `-inf`
past each task's classes, so `argmax` and `softmax` work as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from isomod.core.blocks import KINDS
from isomod.errors import IsomodError


class PerImageNorm:
    """A step's norms of several tasks as one callable per group of images: each image
    normalised by its task's norm (eval mode), as a scale and shift per channel."""

    def __init__(self, norms: list[nn.Module], device: torch.device):
        self.norms = norms
        self.layer = isinstance(norms[0], nn.LayerNorm)
        self.eps = norms[0].eps
        if self.layer:  # statistics per token; only the affine parameters differ between tasks
            ones = torch.ones(norms[0].normalized_shape, device=device)
            self.scale = torch.stack([n.weight if n.weight is not None else ones for n in norms])  # (T, C)
            self.shift = torch.stack([n.bias if n.bias is not None else 0 * ones for n in norms])
        else:
            scales, shifts = [], []
            for n in norms:
                s = torch.rsqrt(n.running_var + n.eps)  # (C,)
                w = n.weight if n.weight is not None else torch.ones_like(s)
                b = n.bias if n.bias is not None else torch.zeros_like(s)
                scales.append(w * s)
                shifts.append(b - n.running_mean * w * s)
            self.scale, self.shift = torch.stack(scales), torch.stack(shifts)  # (T, C)

    def on(self, rows: torch.Tensor, task: int | None = None):
        """The norm of the images whose task indices are `rows` `(G,)`; when they are all of
        one task (`task`), that task's own norm module."""
        if task is not None:
            return self.norms[task]
        scale, shift = self.scale[rows], self.shift[rows]  # (G, C)
        if self.layer:
            c = scale.shape[1]
            return lambda z: torch.addcmul(shift[:, None, :], F.layer_norm(z, (c,), eps=self.eps), scale[:, None, :])
        return lambda z: torch.addcmul(shift[:, :, None, None], z, scale[:, :, None, None])  # (G, C, H, W)


def forward_mixed(model, x: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """Logits `(B, K_max)` of images `x` `(B, ...)`, image `i` under task `tasks[i]`."""
    if len(tasks) != len(x):
        raise IsomodError(f"a batch of several tasks needs one task name per image: {len(tasks)} names for "
                          f"{len(x)} images")
    names = list(dict.fromkeys(tasks))
    for name in names:
        model.check_task(name)
    if model.training:
        raise IsomodError("a batch of several tasks runs in eval mode (each image takes its task's norm statistics): "
                          "call model.eval() first")
    index = torch.tensor([names.index(t) for t in tasks], device=x.device)  # (B,) task of each image
    if len(names) == 1:
        return model(x, names[0])
    if model.config.mixing != "weight" and any(not model.route(n).is_discrete for n in names):
        return per_task(model, x, names, index)  # output mixing: each task on its own images
    h = model.stem(x)  # (B, C, H', W'), or tokens (B, T, C)
    routes = [model.route(n) for n in names]
    mixed = {i: model.mixed_params(r) for i, r in enumerate(routes) if not r.is_discrete}
    branches = [model.branch(n) for n in names]
    for l in range(routes[0].steps):
        norm1 = PerImageNorm([b.norms[2 * l] for b in branches], h.device)
        norm2 = PerImageNorm([b.norms[2 * l + 1] for b in branches], h.device)
        out = h.clone()
        for rows_mask, params, alone in step_groups(model, routes, mixed, index, l):
            rows = rows_mask.nonzero().flatten()
            tid = index[rows]
            out[rows] = model.pool.run(h[rows], params, norm1.on(tid, alone), norm2.on(tid, alone))
        h = out
    final = PerImageNorm([b.norms[-1] for b in branches], h.device)
    features = KINDS[model.config.block].features(final.on(index)(h))  # (B, C)
    return heads(model, features, names, index)


def step_groups(model, routes, mixed: dict, index: torch.Tensor, step: int):
    """The groups of images one block call runs at `step`, with its weights and, when they are
    all of one task, that task's index: the images whose discrete routes run module `m`, then
    each soft-routed task's images."""
    by_module: dict[int, list[int]] = {}
    for i, r in enumerate(routes):
        if r.is_discrete:
            by_module.setdefault(r.chosen[step], []).append(i)
    for m, tasks in by_module.items():
        yield (torch.isin(index, torch.tensor(tasks, device=index.device)), model.pool.blocks[m].params(),
               tasks[0] if len(tasks) == 1 else None)
    for i, params in mixed.items():
        yield index == i, {name: p[step] for name, p in params.items()}, i


def heads(model, features: torch.Tensor, names: list[str], index: torch.Tensor) -> torch.Tensor:
    """Each image's logits under its task's head, `-inf` past its task's classes."""
    k_max = max(model.specs[n].num_classes for n in names)
    logits = features.new_full((len(features), k_max), float("-inf"))
    for i, name in enumerate(names):
        rows = (index == i).nonzero().flatten()
        logits[rows, : model.specs[name].num_classes] = model.forward_head(features[rows], name)
    return logits


def per_task(model, x: torch.Tensor, names: list[str], index: torch.Tensor) -> torch.Tensor:
    k_max = max(model.specs[n].num_classes for n in names)
    logits = x.new_full((len(x), k_max), float("-inf"))
    for i, name in enumerate(names):
        rows = (index == i).nonzero().flatten()
        logits[rows, : model.specs[name].num_classes] = model(x[rows], name)
    return logits
