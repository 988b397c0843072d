"""`make gpu-check`: every command a user runs, for a few steps each, on a device, in fp32 and
bf16; one line per command (`ok` or `FAIL` with the error's last line) and a summary.

    python scripts/gpu_check.py                      # --device cuda, fp32 and bf16
    python scripts/gpu_check.py --device cpu --precisions fp32 --quick   # the script itself, on a CPU

It trains a tiny glyph model and a tiny three-domain digits5 model, then runs train, eval,
predict, export (the file read back on the CPU), every transfer method, every adaptation
method in its setting, bench speed, and torchrun with 2 processes (NCCL on CUDA: skipped
with fewer than 2 GPUs). Exit status 1 when any line failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--model-channels", "8", "--model-num-modules", "4", "--model-steps", "3", "--model-stem-stride", "4",
        "--batch-size", "16", "--log-every", "2", "--checkpoint-every", "0", "--no-progress"]


def isomod(*args: str) -> list[str]:
    return [sys.executable, "-m", "isomod", *args]


class Checks:
    def __init__(self):
        self.failed = 0

    def run(self, label: str, cmd: list[str], env: dict | None = None) -> bool:
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
        seconds = time.time() - t0
        if done.returncode == 0:
            print(f"ok    {label:<48} {seconds:6.1f} s", flush=True)
            return True
        self.failed += 1
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        print(f"FAIL  {label:<48} {seconds:6.1f} s  {last[:200]}", flush=True)
        return False

    def skip(self, label: str, why: str) -> None:
        print(f"skip  {label:<48}          {why}", flush=True)


def methods(kind: str) -> list[tuple[str, str]]:
    """(name, setting) of every registered method of `kind` (`transfer` or `adapt`)."""
    if kind == "transfer":
        from isomod.methods.transfer import TRANSFER as registry
    else:
        from isomod.methods.adapt import ADAPT as registry
    return [(m.name, m.setting) for m in registry]


def check(device: str, precision: str, work: Path, checks: Checks, quick: bool) -> None:
    run = ["--device", device, "--precision", precision]
    tag = f"{device} {precision}"
    glyphs, digits = work / f"glyphs-{precision}", work / f"digits-{precision}"
    if not checks.run(f"train ({tag})", isomod("train", "--tasks", "glyphs/digits", "glyphs/greek", "--steps", "6",
                                                 "--out", str(glyphs), *TINY, *run)):
        return
    compiler = "aot_eager" if quick else "inductor"  # inductor on a CPU needs a C++ toolchain and minutes
    checks.run(f"train compiled, {compiler} ({tag})", isomod(
        "train", "--tasks", "glyphs/digits", "glyphs/greek", "--steps", "6", "--out", str(work / f"compiled-{precision}"),
        *TINY, *run, "--compile", compiler, "--discretize-at", "0.5"))
    checks.run(f"train grouped, 2 tasks a step ({tag})", isomod(
        "train", "--tasks", "glyphs/digits", "glyphs/greek", "--steps", "6", "--out", str(work / f"grouped-{precision}"),
        *TINY, *run, "--tasks-per-step", "2", "--group-tasks", "true", "--discretize-at", "0.5"))
    checks.run(f"eval ({tag})", isomod("eval", "--from", str(glyphs), "--device", device, "--limit", "64",
                                       "--split", "train"))
    sample = work / "sample.png"
    if not sample.exists():
        import numpy as np
        from PIL import Image

        Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype("uint8")).save(sample)
    checks.run(f"predict ({tag})", isomod("predict", "--from", str(glyphs), "--task", "glyphs/greek", str(sample),
                                          "--device", device))
    exported = work / f"greek-{precision}.pt"
    if checks.run(f"export ({tag})", isomod("export", "--from", str(glyphs), "--task", "glyphs/greek", "--format",
                                            "torchscript", "--out", str(exported), "--device", device)):
        checks.run(f"export read back on the CPU ({tag})", [sys.executable, "-c", (
            "import torch; net = torch.jit.load(%r, map_location='cpu'); "
            "assert all(p.device.type == 'cpu' for p in net.parameters()); net(torch.rand(2, 1, 28, 28))"
        ) % str(exported)])
    for name, _ in methods("transfer")[: 2 if quick else None]:
        checks.run(f"transfer {name} ({tag})", isomod("transfer", "--from", str(glyphs), "--task", "glyphs/hebrew",
                                                      "--method", name, "--steps", "3", "--out",
                                                      str(work / f"tr-{name}-{precision}"), "--batch-size", "16",
                                                      "--no-progress", *run))
    if not checks.run(f"train three digits5 domains ({tag})", isomod(  # route_calibrated leaves one out of three
            "train", "--tasks", "digits5/mnist", "digits5/synth", "digits5/street", "--steps", "6", "--out", str(digits),
            *TINY, "--model-route-init", "permutation", *run)):
        return
    for name, setting in methods("adapt")[: 3 if quick else None]:
        extra = ["--shots", "2"] if setting == "few_labels" else []
        checks.run(f"adapt {name} ({tag})", isomod("adapt", "--from", str(digits), "--target", "digits5/uci",
                                                   "--method", name, "--steps", "3", "--batch-size", "16", "--out",
                                                   str(work / f"ad-{name}-{precision}"), "--no-progress",
                                                   "--search-max-candidates", "4", *extra, *run))
    checks.run(f"bench speed ({tag})", isomod("bench", "speed", "--out", str(work / f"speed-{precision}"), "--modules",
                                              "4", "--tasks", "1", "2", "--warmup", "1", "--repeats", "2",
                                              "--model-channels", "8", "--batch-size", "8", "--no-progress", *run))


def check_torchrun(device: str, work: Path, checks: Checks) -> None:
    import torch

    label = f"torchrun, 2 processes ({'nccl' if device == 'cuda' else 'gloo'})"
    if device == "cuda" and torch.cuda.device_count() < 2:
        checks.skip(label, f"{torch.cuda.device_count()} GPU: NCCL needs one GPU a process")
        return
    checks.run(label, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                       "isomod", "train", "--tasks", "glyphs/digits", "--steps", "4", "--out", str(work / "ddp"),
                       *TINY, "--device", device], env={"OMP_NUM_THREADS": "1"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks the script itself)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--quick", action="store_true", help="a few methods of each kind only")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: gpu-check needs one (`--device cpu` checks the script itself)")
        return 2
    print(f"gpu-check on {args.device} ({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}", flush=True)
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="isomod-gpu-check-") as tmp:
        for precision in args.precisions:
            check(args.device, precision, Path(tmp), checks, args.quick)
        check_torchrun(args.device, Path(tmp), checks)
    print(f"{'all passed' if not checks.failed else f'{checks.failed} failed'}", flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
