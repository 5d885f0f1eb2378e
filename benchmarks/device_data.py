"""Pack what `benchmarks/transfer.py` reads into one small folder that can travel with the
checkout to a lent GPU machine (which sees the repository, not `../shared`).

    python benchmarks/device_data.py [--data ../shared/data] [--out device-data] [--quality 75]

Writes, under --out (ignored by git, see .gitignore):
  data/unlabeled/caltech/*.jpg   the pre-training photos, re-encoded at --quality
  data/caltech10/{train,test}/   the probe's photos, re-encoded at --quality
  work/motion-24/                motion-mask shards from `mtssl prep` of the real clips and
                                 DAVIS frames (prepared here on the CPU: transfer.py reuses
                                 a prepared folder in its --work)
and prints the total size. The device run then is, from the repository root:

    cp -r device-data/work /tmp/transfer && PYTHONPATH=. python benchmarks/transfer.py \\
        --device cuda --data device-data/data --work /tmp/transfer --trunks random,naive

Re-encoding (JPEG quality 75 by default) keeps the folder under the device's 64 MiB carry
limit; it adds compression artefacts to photos that are already JPEGs, so figures from packed
data are not the CPU table's figures on the same photos.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402  (the benchmark beside this file: one owner of the motion prep)

LIMIT = 64 * 2**20  # the device tool's carry limit, repository included


def reencode(src: Path, dst: Path, *, quality: int) -> int:
    """Every JPEG under `src` -> the same relative path under `dst`; returns the files written."""
    n = 0
    for f in sorted(src.rglob("*.jpg")):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            im.convert("RGB").save(out, "JPEG", quality=quality)
        n += 1
    return n


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=transfer.ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=transfer.ROOT / "device-data")
    ap.add_argument("--quality", type=int, default=75)
    args = ap.parse_args(argv)
    data, out = args.data.resolve(), args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    for part in ("unlabeled/caltech", "caltech10"):
        n = reencode(data / part, out / "data" / part, quality=args.quality)
        print(f"{part}: {n} photos, {size(out / 'data' / part) / 2**20:.1f} MiB", flush=True)
    motion = transfer.prepare_motion(data, out / "work", frames_per_video=24)
    shutil.rmtree(out / "work" / "motion-input")  # links into --data: they would not travel
    print(f"motion masks: {size(motion) / 2**20:.1f} MiB")
    total = size(out)
    print(f"total {total / 2**20:.1f} MiB in {out}")
    if total > LIMIT:
        sys.exit(f"{total / 2**20:.1f} MiB is over the {LIMIT // 2**20} MiB carry limit; "
                 "lower --quality")


if __name__ == "__main__":
    main()
