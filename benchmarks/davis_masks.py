"""Quality (DAVIS J) and cost (frames/s on one core) of unsupervised motion masks on the DAVIS 2016
sequences in shared data: the settings `mtssl prep` uses now against those it used before, in
one run.

    python benchmarks/davis_masks.py [--frame-step N] [--baseline-frame-step N] [--short-side PX]

"chosen": frames shrunk to --short-side (240, prep's default frame_short_side: 427x240 for
DAVIS's 854x480) and motion_mask's defaults (DIS "fine", guided-filter refinement), i.e. what
prep computes. "previous": the same frames with the defaults before that (DIS medium, GrabCut
once on a crop of <= 320 px). "before": the full 854x480 frames at work size 640, DIS medium,
GrabCut (3 iterations) on the full-resolution crop, the settings before the speed-up. Cost is
CPU seconds of this process with OpenCV and BLAS held to one thread, so frames/s are per core
even on a machine shared with other jobs; wall seconds are printed beside them. The masks'
thresholds, sizes and weights were chosen by measuring J on these same ten sequences: the J
figures are in-sample, not held out.
"""
from __future__ import annotations

import os

# One thread everywhere, set before numpy / OpenCV load: the figures are per core.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtssl.prep.davis import davis_j  # noqa: E402

BEFORE = {"work_size": 640, "preset": "medium", "refine": "grabcut", "refine_size": None, "refine_iters": 3}
PREVIOUS = {"preset": "medium", "refine": "grabcut", "refine_size": 320, "refine_iters": 1}


def table(title: str, r: dict) -> None:
    w, h = r["mask_size"]
    print(f"\n{title}: masks at {w}x{h}")
    print(f"{'sequence':16s} {'frames':>6s} {'J':>6s} {'J_kept':>6s} {'kept':>5s} {'J_fg':>6s} {'J_bg':>6s}")
    for name, s in r["per_sequence"].items():
        jk = "  -   " if s["J_kept"] is None else f"{s['J_kept']:6.3f}"
        print(f"{name:16s} {s['frames']:6d} {s['J']:6.3f} {jk} {s['kept_fraction']:5.2f} "
              f"{s['J_all_fg']:6.3f} {s['J_all_bg']:6.3f}")
    print(f"mean J over {len(r['per_sequence'])} sequences: {r['J_mean']:.3f} (all-foreground "
          f"{r['J_all_fg_mean']:.3f}, all-background {r['J_all_bg_mean']:.3f}); kept by the "
          f"frame filter {r['kept_fraction']:.3f}; skipped files {r['skipped_files']}")
    print(f"{r['frames']} frames: {r['cpu_seconds']:.1f} CPU-s = {r['frames_per_cpu_s']:.2f} "
          f"frames/s per core ({r['wall_seconds']:.1f} s wall = {r['frames_per_s']:.2f} frames/s)")


def main(argv: list[str] | None = None) -> int:
    import cv2

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "davis2016")
    ap.add_argument("--frame-step", type=int, default=1, help="score every N-th frame (default 1)")
    ap.add_argument("--baseline-frame-step", type=int, default=None,
                    help="score the slow 'before' settings on every N-th frame only (default: "
                         "--frame-step); 'chosen' is then also scored on those frames")
    ap.add_argument("--short-side", type=int, default=240,
                    help="frames are shrunk to this short side for 'chosen' (default 240)")
    ap.add_argument("--sequences", nargs="*", default=None)
    args = ap.parse_args(argv)
    if not (args.data / "JPEGImages" / "480p").is_dir():
        print(f"DAVIS 2016 frames not found under {args.data}", file=sys.stderr)
        return 2
    cv2.setNumThreads(1)
    base_step = args.baseline_frame_step or args.frame_step
    load = os.getloadavg()
    print(f"data={args.data} offsets=(-1, 1) cpus={os.cpu_count()} load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    chosen = davis_j(args.data, sequences=args.sequences, frame_step=args.frame_step,
                     short_side=args.short_side)
    table(f"chosen (short side {args.short_side}, motion_mask defaults), every "
          f"{args.frame_step}. frame", chosen)
    same = chosen
    if base_step != args.frame_step:
        same = davis_j(args.data, sequences=args.sequences, frame_step=base_step,
                       short_side=args.short_side)
        table(f"chosen on the 'before' frames (every {base_step}. frame)", same)
    previous = davis_j(args.data, sequences=args.sequences, frame_step=base_step,
                       short_side=args.short_side, **PREVIOUS)
    table(f"previous (short side {args.short_side}, {PREVIOUS}), every {base_step}. frame", previous)
    before = davis_j(args.data, sequences=args.sequences, frame_step=base_step, **BEFORE)
    table(f"before ({BEFORE}), every {base_step}. frame", before)
    print(f"\non the same {same['frames']} frames: chosen J {same['J_mean']:.3f} vs before "
          f"{before['J_mean']:.3f} (difference {same['J_mean'] - before['J_mean']:+.3f}); "
          f"{same['frames_per_cpu_s']:.2f} vs {before['frames_per_cpu_s']:.2f} frames/s per core "
          f"= {same['frames_per_cpu_s'] / before['frames_per_cpu_s']:.1f}x")
    print(f"previous: J {previous['J_mean']:.3f} (difference to before "
          f"{previous['J_mean'] - before['J_mean']:+.3f}), "
          f"{previous['frames_per_cpu_s']:.2f} frames/s per core")
    print("J is in-sample: the settings were chosen by measuring these sequences.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
