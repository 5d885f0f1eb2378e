"""Time soft encoding of colorization targets: lookup table (SoftEncoder) vs brute force
(soft_encode_exact), on 256x256 crops of real photos (skimage's astronaut, coffee, chelsea).

    python benchmarks/colour_encoding.py [--batch 16] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from skimage import data

from mtssl.colour import SoftEncoder, ab_bins, dense, rgb_to_lab, soft_encode_exact


def photo_crops(n: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    """n random size x size crops, cycling over three real photos, (n, 3, size, size) in [0, 1]."""
    rng = np.random.default_rng(seed)
    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        y = rng.integers(0, img.shape[0] - size + 1)
        x = rng.integers(0, img.shape[1] - size + 1)
        crops.append(torch.from_numpy(img[y:y + size, x:x + size].copy()).permute(2, 0, 1))
    return torch.stack(crops).float() / 255


def timed(fn, device: torch.device) -> float:
    """Wall seconds of one call of fn."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=2,
                        help="images per brute-force call (bounds its memory)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    start = time.perf_counter()
    bins = ab_bins()
    bins_s = time.perf_counter() - start
    start = time.perf_counter()
    encoder = SoftEncoder(bins=bins).to(device)
    table_s = time.perf_counter() - start
    ab = rgb_to_lab(photo_crops(args.batch).to(device))[:, 1:]  # (B, 2, 256, 256)
    n = ab.shape[0]

    encoder.encode(ab)  # warm-up
    lut_s = statistics.median(timed(lambda: encoder.encode(ab), device) for _ in range(args.repeats))

    exact_s, agree, l1 = 0.0, 0, 0.0
    for chunk in ab.split(args.chunk):
        result = {}
        exact_s += timed(lambda: result.update(exact=soft_encode_exact(chunk, bins)), device)
        idx_e, w_e = result["exact"]
        idx_l, w_l = encoder.encode(chunk)
        agree += int((idx_e[:, 0] == idx_l[:, 0]).sum())
        l1 += float((dense(idx_e, w_e, len(bins)) - dense(idx_l, w_l, len(bins))).abs().sum(1).sum())
    pixels = ab[:, 0].numel()

    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {n} x 256x256 photo crops")
    print(f"bins: Q = {len(bins)} (ab_bins {bins_s:.2f} s uncached); "
          f"lookup table {encoder.n_a}x{encoder.n_b} "
          f"cells, step {encoder.step}, built in {table_s:.2f} s")
    print(f"LUT encode:   {1000 * lut_s / n:8.2f} ms/image (median of {args.repeats} batch calls)")
    print(f"exact encode: {1000 * exact_s / n:8.2f} ms/image ({args.chunk} images per call)")
    print(f"speed ratio exact/LUT: {exact_s / lut_s:.1f}x")
    print(f"agreement: nearest bin identical for {100 * agree / pixels:.3f}% of pixels; "
          f"mean L1 between dense encodings {l1 / pixels:.4f}")


if __name__ == "__main__":
    main()
