"""Where a run's randomness is fixed: `seed(value)`, the one call that sets torch's global
generator (CPU and every CUDA device). No other module of the package calls
`torch.manual_seed` (a test holds it), so the points a run is seeded at are these calls,
each reading the seed of the run's config:

- building a model (`isomod train`, a bench's model): its initial weights;
- `Trainer.fit`: the batches, augmentation and route draws of the run;
- a transfer or adaptation that adds weights (a new head, a scratch network, a
  discriminator): those weights follow the seed, not what ran before in the process.

Data splits and batch orders draw from their own `torch.Generator`s seeded from the same
config, so they do not depend on these calls.
"""

from __future__ import annotations

import torch


def seed(value: int) -> None:
    """Fix torch's global random generator to `value` (on the CPU and every CUDA device)."""
    torch.manual_seed(value)
