"""Peak memory of `mtssl prep` (and of reading the result) for 1k vs 10k images: it must not
grow with the number of images.

Inputs are small crops of real photos (Caltech-101 photos from ../shared/data/unlabeled/caltech,
or scikit-image's bundled photos when that folder is absent), written as JPEGs in a temp dir,
1000 per sub-folder. Each prep and each full read runs in a fresh process that reports its own
peak RSS: once imports are done and the colour tables built (a one-off start-up transient), the
transient is handed back (malloc_trim) and the high-water mark (VmHWM) is reset, so the peak
compared is the process's peak while preparing (or reading), libraries included, split into the
RSS after imports and the growth while working.

    python benchmarks/prep_memory.py [--sizes 1000 10000] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CALTECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "unlabeled" / "caltech"

CHILD = r"""
import ctypes, gc, json, resource, sys, time
from mtssl.prep.dataset import prepare
from mtssl.prep.options import PrepConfig
from mtssl.data.shards import ShardImages
mode, src, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


loaded = status_mib("VmHWM")
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the transient back, for a steady baseline
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
    f.write("5")
before = status_mib("VmRSS")
t0 = time.perf_counter()
if mode == "prep":
    m = prepare(PrepConfig(input=src, output=out, short_side=64, shard_mb=4, workers=workers,
                           progress=False))
    n = m["images"]["count"]
else:
    source = ShardImages(out)
    n = sum(source.load(i).shape[0] > 0 for i in range(len(source)))
print(json.dumps({"n": n, "seconds": time.perf_counter() - t0, "startup_peak_mib": loaded,
                  "rss_before_mib": before, "work_peak_mib": status_mib("VmHWM"),
                  # the largest worker process's peak (0 when the prep ran in this process)
                  "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def photos() -> list[np.ndarray]:
    if CALTECH.is_dir():
        files = sorted(CALTECH.iterdir())[::20]
        return [np.asarray(Image.open(f).convert("RGB")) for f in files]
    import skimage.data
    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket()]


def make_inputs(root: Path, n: int, pool: list[np.ndarray], seed: int = 0) -> None:
    """n random 96x128 crops (resampled by a random factor) of the real photos."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = pool[i % len(pool)]
        scale = rng.uniform(0.6, 1.0)
        h, w = int(96 / scale), int(128 / scale)
        h, w = min(h, img.shape[0]), min(w, img.shape[1])
        y, x = rng.integers(img.shape[0] - h + 1), rng.integers(img.shape[1] - w + 1)
        crop = Image.fromarray(img[y:y + h, x:x + w]).resize((128, 96), Image.BILINEAR)
        folder = root / f"part{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"img{i:06d}.jpg", quality=90)


def run_child(mode: str, src: Path, out: Path, workers: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), str(workers)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--workers", type=int, default=1, help="prep processes (1: in the "
                    "measured process itself, whose peak RSS is then the whole prep's)")
    args = ap.parse_args()
    pool = photos()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mtssl-prep-bench-") as tmp:
        for n in args.sizes:
            src, out = Path(tmp) / f"in{n}", Path(tmp) / f"out{n}"
            t0 = time.perf_counter()
            make_inputs(src, n, pool)
            made = time.perf_counter() - t0
            prep = run_child("prep", src, out, args.workers)
            read = run_child("read", src, out, args.workers)
            rows[n] = (prep, read)
            print(f"{n:>6} images (made in {made:.0f}s): prep {prep['n'] / prep['seconds']:.0f} "
                  f"files/s, peak RSS {prep['work_peak_mib']:.1f} MiB = "
                  f"{prep['rss_before_mib']:.1f} after imports + {growth(prep):.1f} while "
                  f"preparing, largest worker {prep['worker_peak_mib']:.1f} MiB | read all back: "
                  f"{read['n'] / read['seconds']:.0f} images/s, peak "
                  f"RSS {read['work_peak_mib']:.1f} MiB = {read['rss_before_mib']:.1f} + "
                  f"{growth(read):.1f}", flush=True)
    small, large = min(rows), max(rows)
    for what, k in (("prep", 0), ("read", 1)):
        a, b = rows[small][k], rows[large][k]
        print(f"{what}, {large} vs {small} images: peak RSS {b['work_peak_mib']:.1f} / "
              f"{a['work_peak_mib']:.1f} MiB = {b['work_peak_mib'] / a['work_peak_mib']:.3f}; "
              f"growth while working {growth(b):.1f} / {growth(a):.1f} MiB"
              + (f"; largest worker {b['worker_peak_mib']:.1f} / {a['worker_peak_mib']:.1f} MiB"
                 if what == "prep" and args.workers > 1 else ""))


def growth(row: dict) -> float:
    return row["work_peak_mib"] - row["rss_before_mib"]


if __name__ == "__main__":
    main()
