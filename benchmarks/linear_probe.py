"""Linear-probe top-1/top-5 on caltech10 for a random-init trunk vs the quickstart-pretrained
trunk vs a longer pre-training of the same config, plus feature-extraction images/s.

    python benchmarks/linear_probe.py [--checkpoint RUN_OR_PT ...] [--long-factor 3]
        [--long-minutes 30] [--data ../shared/data/caltech10] [--set image_size=96]

Without --checkpoint it runs `mtssl train --config quickstart --no-report` into --work. The
longer run is the quickstart config with --long-factor times the first checkpoint's steps
(0 skips it), stopped early by schedule.time_budget_s at --long-minutes; the steps it reached
are printed. Features are extracted afresh (no cache; the files are read once beforehand so
the OS cache is warm for every trunk alike): images/s is decode + forward on this machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtssl.eval.common import load_trunk, random_trunk, suite_settings
from mtssl.eval.imagenet import run

ROOT = Path(__file__).resolve().parents[1]


def pretrain(out: Path, *sets: str) -> tuple[Path, float]:
    """`mtssl train --config quickstart` into out; (run dir, wall seconds)."""
    cmd = [sys.executable, "-m", "mtssl.cli", "train", "--config", "quickstart", "--out", str(out),
           "--no-report", "--set", "output.progress=false",
           *[a for s in sets for a in ("--set", s)]]
    print("$", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "caltech10"))
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="pre-trained run/checkpoint, repeatable (default: train quickstart)")
    ap.add_argument("--long-factor", type=float, default=3.0,
                    help="longer pre-training: this many times the checkpoint's steps (0: skip)")
    ap.add_argument("--long-minutes", type=float, default=30.0,
                    help="wall-clock cap of the longer pre-training in minutes")
    ap.add_argument("--work", help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--settings", default="smoke", choices=("smoke", "paper"))
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="probe setting override, e.g. --set image_size=96")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mtssl-probe-"))
    s = suite_settings("imagenet", args.settings, args.overrides)
    print(f"probe settings ({args.settings}): {s}\ntorch threads: {torch.get_num_threads()}")

    trunks = []
    for source in args.checkpoint:
        loaded = load_trunk(source)
        trunks.append((f"{source} ({loaded.step} steps)", loaded))
    if not trunks:
        run_dir, seconds = pretrain(work / "quickstart")
        loaded = load_trunk(str(run_dir))
        print(f"quickstart: {loaded.step} steps in {seconds:.0f} s wall")
        trunks.append((f"quickstart ({loaded.step} steps)", loaded))
    if args.long_factor > 0:
        steps = int(args.long_factor * trunks[0][1].step)
        run_dir, seconds = pretrain(work / "long", f"schedule.max_steps={steps}",
                                    f"schedule.time_budget_s={args.long_minutes * 60}")
        long = load_trunk(str(run_dir))
        print(f"long: {long.step} of {steps} steps in {seconds:.0f} s wall")
        trunks.append((f"longer ({long.step} of {steps} steps)", long))
    trunks.insert(0, ("random init", random_trunk(trunks[0][1].arch)))

    for path in Path(args.data).rglob("*"):
        if path.is_file():
            path.read_bytes()
    rows = []
    for name, loaded in trunks:
        r = run(loaded, Path(args.data), s, settings_name=args.settings, cache_dir=None)
        rows.append((name, loaded.hours, r["metrics"]["top1"], r["metrics"].get("top5"),
                     r["extract_images_per_s"], r["seconds"]))
        print(f"{name}: top1 {r['metrics']['top1']:.4f} top5 {r['metrics'].get('top5', 0):.4f} "
              f"({r['train_images']} train / {r['eval_images']} test images, "
              f"skipped {r['skipped'] or 'none'})", flush=True)
    print("\n| trunk | pre-training device-hours | top-1 | top-5 | extraction images/s | probe s |")
    print("|---|---|---|---|---|---|")
    for name, hours, top1, top5, rate, secs in rows:
        print(f"| {name} | {hours:.4f} | {top1:.4f} | {top5:.4f} | {rate:.1f} | {secs:.0f} |")
    base = rows[0][2]
    for name, _, top1, *_ in rows[1:]:
        verdict = "beats" if top1 > base else "does NOT beat"
        print(f"{name} {verdict} random init on top-1 ({top1:.4f} vs {base:.4f})")


if __name__ == "__main__":
    main()
