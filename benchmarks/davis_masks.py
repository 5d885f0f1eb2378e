"""Quality and speed of unsupervised motion masks on the DAVIS 2016 sequences in shared data.

    python benchmarks/davis_masks.py [--data PATH] [--frame-step N] [--work-size PX]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtssl.prep.motion import davis_j  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "davis2016")
    ap.add_argument("--frame-step", type=int, default=2, help="score every N-th frame (default 2)")
    ap.add_argument("--work-size", type=int, default=640, help="long side for flow and masks (default 640)")
    ap.add_argument("--no-refine", action="store_true", help="skip the GrabCut refinement")
    ap.add_argument("--sequences", nargs="*", default=None)
    args = ap.parse_args(argv)
    if not (args.data / "JPEGImages" / "480p").is_dir():
        print(f"DAVIS 2016 frames not found under {args.data}", file=sys.stderr)
        return 2

    print(f"data={args.data} frame_step={args.frame_step} work_size={args.work_size} "
          f"refine={not args.no_refine} offsets=(-1, 1) flow=DIS-medium cpus={os.cpu_count()}")
    r = davis_j(args.data, sequences=args.sequences, frame_step=args.frame_step,
                work_size=args.work_size, refine=not args.no_refine)
    print(f"{'sequence':16s} {'frames':>6s} {'J':>6s} {'J_kept':>6s} {'kept':>5s} {'J_fg':>6s} {'J_bg':>6s}")
    for name, s in r["per_sequence"].items():
        jk = "  -   " if s["J_kept"] is None else f"{s['J_kept']:6.3f}"
        print(f"{name:16s} {s['frames']:6d} {s['J']:6.3f} {jk} {s['kept_fraction']:5.2f} "
              f"{s['J_all_fg']:6.3f} {s['J_all_bg']:6.3f}")
    jk = "n/a" if r["J_kept_mean"] is None else f"{r['J_kept_mean']:.3f}"
    print(f"mean J over {len(r['per_sequence'])} sequences: {r['J_mean']:.3f}  "
          f"(all-foreground {r['J_all_fg_mean']:.3f}, all-background {r['J_all_bg_mean']:.3f})")
    n_with_kept = sum(s["J_kept"] is not None for s in r["per_sequence"].values())
    print(f"frames kept by Pathak filter: {r['kept_fraction']:.3f}; "
          f"J on kept frames: {jk} (mean over the {n_with_kept} sequences with kept frames)")
    print(f"{r['frames']} frames in {r['seconds']:.1f} s = {r['frames_per_s']:.2f} frames/s; "
          f"skipped files: {r['skipped_files']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
