"""Data-parallel training over processes started by `torchrun`, one code path for one or many.

    torchrun --nproc_per_node=P -m isomod train ...      # CPU (gloo) or one GPU per process (nccl)

Rank and world size come from the environment torchrun sets; in a single process every
function here is a no-op. All ranks draw the same global batch (same seed) and each runs
its contiguous share of it; batch-norm statistics are computed over the whole global
batch (`BatchNorm`), and gradients are averaged by one all-reduce per step. A run on `P`
processes therefore computes what one process computes with the same global batch, up to
float rounding. Rank 0 alone writes logs, progress bars and checkpoints.

Gradients are averaged explicitly rather than through `DistributedDataParallel`:
objectives call parts of the model (`forward_features`, heads) and routes switch
parameters on and off when they become discrete, which a wrapper's hooks do not follow.
"""

from __future__ import annotations

import atexit
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def backend_for(device: str) -> str:
    """The process-group backend for the device a run asks for: `nccl` for CUDA (`auto` on a
    machine with CUDA, `cuda`, `cuda:K`), `gloo` for the CPU."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def setup(device: str = "auto") -> None:
    """Join the process group torchrun describes, once, with the backend for `device`;
    nothing in a single process.

    The group is left again at a clean exit (`teardown`), as torch asks of every process
    (nccl warns otherwise, and may leave pending operations unfinished)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        atexit.register(_teardown_at_exit)


def teardown() -> None:
    """Leave the process group, if one is joined; safe to call more than once."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _teardown_at_exit() -> None:
    # After an uncaught exception (Python has stored it in `sys.last_value`) the other
    # ranks may be waiting in a collective; destroying an NCCL group then can block, so the
    # failing process just exits and torchrun stops the rest.
    if getattr(sys, "last_value", None) is None:
        teardown()


def local_device() -> torch.device:
    """This process's GPU under torchrun (`cuda:LOCAL_RANK`), or the default CUDA device."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def shard(n: int) -> slice:
    """This rank's contiguous share of `n` items (shares differ by at most one)."""
    p, r = world_size(), rank()
    return slice(r * n // p, (r + 1) * n // p)


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            _collective(dist.broadcast, t.data, 0)


def average_gradients(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Average the gradients of `params` and the value of `loss` over ranks, in one
    all-reduce; returns the averaged loss (the local one in a single process)."""
    if world_size() == 1:
        return loss.detach()
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
    _collective(dist.all_reduce, flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1]


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `values` (a copy; the input is left as it is)."""
    out = values.clone()
    if world_size() > 1:
        _collective(dist.all_reduce, out)
    return out


def _collective(op, tensor: torch.Tensor, *args) -> None:
    """Run the collective `op(tensor, *args)` and return once no communication thread
    still holds `tensor`.

    gloo's worker thread lets go of a finished collective's tensors a moment after the
    caller has been told it finished (a third of the time, here). Letting go takes the GIL,
    since torch keeps a tensor's C++ and Python reference counts linked, and a thread that
    takes the GIL once the interpreter has begun to finalise is ended inside a destructor:
    the process aborts ("terminate called without an active exception") after its work
    succeeded. Waiting here, with the GIL released, costs no measurable time. CUDA tensors
    (nccl) are released by a watchdog thread on its own schedule and are not waited for.
    """
    held_before = tensor._use_count()
    op(tensor, *args)
    if tensor.device.type != "cpu":
        return
    deadline = time.monotonic() + 5.0
    while tensor._use_count() > held_before and time.monotonic() < deadline:
        time.sleep(0)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class _SumOverRanks(torch.autograd.Function):
    """`all_sum` with a gradient: the gradient of a sum over ranks is the sum over ranks of
    the gradients, since every rank's loss depends on every rank's input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_sum(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_sum(grad)


class BatchNorm(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training statistics cover the global batch of all ranks.

    In a single process, or in eval mode, it is exactly `nn.BatchNorm2d`. Across ranks
    the mean and variance come from differentiable all-reduces, so gradients flow through
    every rank's share of the batch as they would through one process's whole batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked += 1
            if momentum is None:
                momentum = 1.0 / self.num_batches_tracked.item()
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return global_batch_norm(x, *running, self.weight, self.bias, momentum, self.eps)


def global_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                      weight: torch.Tensor | None, bias: torch.Tensor | None, momentum: float,
                      eps: float) -> torch.Tensor:
    """Training-mode batch norm of `x` `(B, C, H, W)` over the global batch of all ranks,
    updating `running_mean` and `running_var` `(C,)` in place (unless None), as
    `F.batch_norm` does in one process (there: exactly `F.batch_norm`)."""
    if world_size() == 1:
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    # Statistics in fp32 whatever the autocast dtype (bf16 would round a count of
    # 25,089 to 25,088 and cannot lerp fp32 running statistics), gathered in one
    # all-reduce: the sums, the sums of squares and the image count (exact in fp32 up
    # to 2^24 values a channel).
    dims, c = (0, 2, 3), x.shape[1]
    xf = x.float()
    local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_full((1,), x.numel() // c)])  # (2C + 1,)
    total = _SumOverRanks.apply(local)
    count = total[-1]
    mean = total[:c] / count  # (C,)
    var = (total[c:2 * c] / count - mean * mean).clamp(min=0)  # (C,), biased
    if running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.detach(), momentum)
            running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), momentum)
    y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + eps)[None, :, None, None]
    if weight is not None:
        y = y * weight[None, :, None, None] + bias[None, :, None, None]
    return y.to(x.dtype)
