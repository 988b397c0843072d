"""Benchmarks: one module per experiment, each writing results.json, report.md and PNGs.

Importing this package imports every bench module, each of which registers itself (see
`isomod.bench.base`); `registry()` gives them by name.
"""

from __future__ import annotations

from isomod.bench.base import BENCHES, Bench
from isomod.bench import mtl, transfer, continual, adapt, reuse, speed, serve  # noqa: F401  each registers itself

NAMES = ("mtl", "transfer", "continual", "adapt", "reuse", "speed", "serve")


def registry() -> dict[str, Bench]:
    """Every benchmark, by name, in the order of `NAMES`."""
    return {name: BENCHES[name] for name in NAMES}
