"""Decodes per step and sampler throughput with data.shared_draws on vs off (issue 12).

    OMP_NUM_THREADS=1 python benchmarks/shared_decode.py            # caltech photos, DAVIS frames
    python benchmarks/shared_decode.py --images DIR --images DIR2 --steps 30 -o KEY=VALUE

(the default folders are those of ../shared/data, see DEFAULT_IMAGES)
For each image folder, the config's tasks that read images (quickstart: relative position,
colorization, exemplar) draw --steps training steps the way the single-process trainer does
with data.num_workers 0: off, every task its own stream (`TaskData.stream`); on, one joint
stream of those tasks (`TaskData.joint_stream`). Both draw the same step numbers, taking turns
step by step, so a machine whose speed drifts slows them alike. It counts the source's
`load` calls (decodes; the streams' own image_cache as configured) and times the draws on one
thread: samples/s per core. Prints one table with the on/off ratios of this run.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

from mtssl.config import load_config
from mtssl.data.sources import TaskData
from mtssl.eval.report import table_text
from mtssl.tasks import TASKS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# (folder, its own overrides): caltech photos (<= 192 px), VOC photos (median 480x360, up to
# 2000 px), DAVIS frames (854x480), where the quickstart's relative-position grid needs
# 32k pixels of a 16:9 frame (its max_pixels is 30k: every frame would be skipped).
DEFAULT_IMAGES = [(SHARED / "unlabeled" / "caltech", []),
                  (SHARED / "voc_raccoon" / "JPEGImages", []),
                  (SHARED / "davis2016" / "JPEGImages" / "480p",
                   ["tasks.relative_position.max_pixels=40000"])]


class CountedLoads:
    """A source that counts its decodes (load calls)."""

    def __init__(self, source):
        self.source, self.loads = source, 0

    def __len__(self) -> int:
        return len(self.source)

    def name(self, i: int) -> str:
        return self.source.name(i)

    def load(self, i: int):
        self.loads += 1
        return self.source.load(i)


def measure(config: str, overrides: list[str], images: Path, steps: int) -> dict[str, dict]:
    datas: dict[str, TaskData] = {}
    draw: dict = {}
    for mode, flag in (("off", "false"), ("on", "true")):
        cfg = load_config(config, [*overrides, f"data.images={images}", f"data.shared_draws={flag}"])
        data = TaskData(cfg)
        data.sources["images"] = CountedLoads(data.source("images"))
        tasks = [t for t in cfg.enabled_tasks() if TASKS[t].source == "images"]
        datas[mode] = data
        if mode == "on":
            joint = data.joint_stream(tasks)
            draw[mode] = joint.batch
        else:
            streams = {t: data.stream(t) for t in tasks}
            draw[mode] = lambda b, streams=streams: {t: s.batch(b) for t, s in streams.items()}
    seconds, samples = dict.fromkeys(draw, 0.0), dict.fromkeys(draw, 0)
    for mode in draw:  # warm-up: first decodes, allocator
        draw[mode](0)
        datas[mode].sources["images"].loads = 0
    for b in range(1, steps + 1):
        for mode, fn in draw.items():
            t0 = time.perf_counter()
            batches = fn(b)
            seconds[mode] += time.perf_counter() - t0
            samples[mode] += sum(len(batch[TASKS[t].input_key]) for t, batch in batches.items())
    return {mode: {"decodes": datas[mode].sources["images"].loads / steps,
                   "rate": samples[mode] / seconds[mode], "ms": seconds[mode] / steps * 1e3}
            for mode in draw}


def main(argv: list[str] | None = None) -> list[list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("-o", "--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--images", action="append", type=Path,
                    help="image folder (repeatable); default: caltech photos and DAVIS frames")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for folder, own in [(f, []) for f in args.images or []] or DEFAULT_IMAGES:
        r = measure(args.config, [*args.overrides, *own], folder, args.steps)
        off, on = r["off"], r["on"]
        name = str(folder.resolve()) + (f" ({', '.join(own)})" if own else "")
        rows.append([name, f"{off['decodes']:.1f} / {on['decodes']:.1f}",
                     f"{on['decodes'] / off['decodes']:.2f}",
                     f"{off['rate']:.0f} / {on['rate']:.0f}", f"{on['rate'] / off['rate']:.2f}",
                     f"{off['ms']:.1f} / {on['ms']:.1f}"])
    print(f"shared_decode: config {args.config}, {args.steps} steps per setting, one thread, "
          f"torch {torch.__version__}, {datetime.date.today()}")
    header = ["images", "decodes/step off / on", "ratio", "samples/s/core off / on", "ratio",
              "ms/step off / on"]
    print(table_text(header, rows), flush=True)
    return [header, *rows]


if __name__ == "__main__":
    main()
