"""Transfer vs compute, the paper's Figures 3-4 in small: does pre-training help, and does
combining tasks help more?

    python benchmarks/transfer.py [--quick] [--device cpu|cuda] [--work DIR] [--data DIR]
        [--trunks random,relative_position,...,naive,lasso] [--minutes M] [--milestones K]
        [--seed S] [--jobs N]

1. Motion masks: `mtssl prep` of the real clips (`videos/*.mp4`) and DAVIS frame folders in
   --data (cached in --work between runs; not the synthetic clips).
2. Pre-training on `unlabeled/caltech` for the same device-time budget per trunk: each single
   task, all four naive (every head reads the last block-3 unit) and all four with lasso;
   `budget.gpu_hours` stops each run, `milestones.every_gpu_hours` saves K milestones on the way
   (a CPU process counts as one device: device-hours are its wall hours).
3. Linear probes of random init and of every milestone on `caltech10` (train -> test, the
   reporting split; the probe settings were chosen on a split of caltech10/train, see
   docs/experiments.md): the grid probe (headline) and the globally pooled one.
4. One table (trunk and milestone; device-hours; top-1/top-5; pretext metrics on held-out items
   at that step, with chance), the targets of issue 9 checked, a plot and a JSON file in --work.

The full CPU mode (7 minutes per trunk, one run at a time) takes about 47 minutes, --quick
about 15; `--minutes 14 --jobs 2` gives every trunk twice the budget in about 48 minutes on 2
cores (each run one core and one device). --device cuda runs the GPU config (ResNet-v2-50
through block 3) for --minutes per trunk (default 5), one run at a time on the one GPU. A lent
GPU machine that sees only the repository reads the inputs packed by
`benchmarks/device_data.py` (--data and --work from there; the command is in its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mtssl.config import read_yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = tuple(read_yaml("quickstart")["tasks"])  # the quickstart's tasks, each also trained alone
TRUNKS = ("random", *TASKS, "naive", "lasso")

# Pre-training settings per machine kind, on top of the built-in configs. CPU: the quickstart
# trunk. GPU: close to issue 9's measured setting (ResNet-v2-50 to block 3, os 8).
CPU_SETS = ["tasks.exemplar.batch_size=32", "tasks.colorization.batch_size=16",
            "tasks.motion_segmentation.batch_size=16"]
GPU_SETS = ["trunk.depth=50", "trunk.units=null", "trunk.width=1.0", "trunk.output_stride=8",
            "tasks.relative_position.batch_size=16", "tasks.relative_position.patch_size=48",
            "tasks.relative_position.gap=24", "tasks.relative_position.jitter=5",
            "tasks.relative_position.min_pixels=41000", "tasks.relative_position.max_pixels=68000",
            "tasks.colorization.batch_size=32", "tasks.colorization.input_size=128",
            "tasks.exemplar.batch_size=64", "tasks.exemplar.image_size=128",
            "tasks.exemplar.patch_size=64",
            "tasks.motion_segmentation.batch_size=32", "tasks.motion_segmentation.frame_size=[96,128]",
            "data.num_workers=6"]
# Chosen on caltech10/train split 2:1 (docs/experiments.md), never on caltech10/test.
PROBE_SETS = ["image_size=96", "resize=108", "weight_decay=1e-2"]


def start(cmd: list[str], log: Path, *, threads: int | None = None) -> subprocess.Popen:
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with log.open("a") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def wait(proc: subprocess.Popen, log: Path) -> None:
    if proc.wait():
        sys.exit(f"failed ({proc.returncode}); see {log}")


def run(cmd: list[str], log: Path) -> None:
    wait(start(cmd, log), log)


def _frame_count(prepared: Path) -> int:
    return json.loads((prepared / "manifest.json").read_text())["frames"]["count"]


def prepare_motion(data: Path, work: Path, *, frames_per_video: int) -> Path:
    """Real clips + DAVIS frame folders -> `mtssl prep` shards with motion masks (cached)."""
    out = work / f"motion-{frames_per_video}"
    if (out / "manifest.json").exists() and _frame_count(out):
        return out
    staging = work / "motion-input"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "davis").mkdir(parents=True)
    for clip in sorted((data / "videos").glob("*.mp4")):
        (staging / clip.name).symlink_to(clip)
    for seq in sorted((data / "davis2016" / "JPEGImages" / "480p").iterdir()):
        (staging / "davis" / seq.name).symlink_to(seq)
    start = time.perf_counter()
    run([sys.executable, "-m", "mtssl.cli", "prep", str(staging), str(out), "--overwrite",
         "--frames-per-video", str(frames_per_video), "--progress", "false"], work / "prep.log")
    print(f"motion masks prepared in {time.perf_counter() - start:.0f} s", flush=True)
    if not _frame_count(out):
        sys.exit(f"no motion frames prepared from {data}; see {work / 'prep.log'}")
    return out


def pretrain_cmd(trunk: str, *, args, motion: Path, sets: list[str]) -> list[str]:
    out = args.work / "runs" / trunk
    hours = args.minutes / 60
    task_sets = ([f"tasks.{t}.enabled={str(t == trunk).lower()}" for t in TASKS]
                 if trunk in TASKS else [f"lasso.mode={trunk}"])
    cmd = [sys.executable, "-m", "mtssl.cli", "train", "--config", "quickstart", "--out", str(out),
           "--no-report", *(x for s in [
               f"name={trunk}", f"device={args.device}", f"seed={args.seed}",
               f"data.images={args.data / 'unlabeled' / 'caltech'}", f"data.frames={motion}",
               # The budget stops every run; a constant rate keeps all budgets on equal terms.
               "schedule.max_steps=10000000", "schedule.decay=constant",
               f"budget.gpu_hours={hours}", f"milestones.every_gpu_hours={hours / args.milestones}",
               "output.checkpoint_every=10000000", "output.keep_last=1", "output.log_every=50",
               "output.progress=false", *sets, *task_sets] for x in ("--set", s))]
    return cmd


def pretrain_all(names: list[str], *, args, motion: Path) -> dict[str, Path | None]:
    """Pre-train every trunk (cached: a finished run is kept), `args.jobs` at a time. Each run
    is one device: with --jobs 2 on 2 cores, each gets one core (OMP_NUM_THREADS=1) unless the
    environment sets the thread count, and its budget counts its own wall time."""
    runs: dict[str, Path | None] = {n: None if n == "random" else args.work / "runs" / n
                                    for n in names}
    todo = [n for n, out in runs.items() if out is not None and not (out / "done").exists()]
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1)
                                                                // args.jobs)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            n = todo.pop(0)
            shutil.rmtree(runs[n], ignore_errors=True)  # an unfinished run starts afresh
            cmd = pretrain_cmd(n, args=args, motion=motion, sets=args.sets)
            running[n] = (start(cmd, args.work / f"train-{n}.log", threads=threads),
                          time.perf_counter())
        finished = [n for n, (proc, _) in running.items() if proc.poll() is not None]
        if not finished:
            time.sleep(2)
        for n in finished:  # each frees its slot
            proc, began = running.pop(n)
            if proc.returncode:  # stop the others too: a failed benchmark leaves nothing running
                for other, _ in running.values():
                    other.terminate()
                wait(proc, args.work / f"train-{n}.log")
            (runs[n] / "done").write_text(f"{time.perf_counter() - began:.1f}\n")
    return runs


def pretext_at(run_dir: Path, step: int) -> dict[str, dict]:
    """Held-out pretext metrics of the last health record at or before `step`."""
    found: dict = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line) if line.strip() else {}
        if record.get("step", step + 1) <= step and record.get("health"):
            found = record["health"]
    return found


def probe_all(trunks: dict, *, args) -> list[dict]:
    import torch

    import mtssl.tasks  # noqa: F401  registers the tasks whose sections the config holds
    from mtssl.checkpoint import CheckpointStore
    from mtssl.config import load_config
    from mtssl.eval.common import load_entry, random_trunk, suite_settings
    from mtssl.eval.imagenet import run as probe
    from mtssl.storage import open_storage

    device = torch.device(args.device)
    # The headline probe recomputes BatchNorm statistics on the probe's training images (the
    # default); the same grid probe on the checkpoint's statistics is reported beside it.
    settings = {name: suite_settings("imagenet", "smoke", [*PROBE_SETS, *sets]) for name, sets in (
        ("grid", ["pool=grid"]), ("global", ["pool=global"]),
        ("grid_ckpt_bn", ["pool=grid", "bn_stats=checkpoint"]))}
    rows = []

    def add(name: str, loaded, step, pretext: dict) -> None:
        res = {pool: probe(loaded, args.data / "caltech10", s, device=device,
                           cache_dir=args.work / "features")["metrics"]
               for pool, s in settings.items()}
        rows.append({"trunk": name, "step": step, "hours": loaded.hours or 0.0,
                     "top1": res["grid"]["top1"], "top5": res["grid"]["top5"],
                     "global_top1": res["global"]["top1"],
                     "top1_ckpt_bn": res["grid_ckpt_bn"]["top1"], "pretext": pretext})
        print(f"  {name:<20} step {step!s:>7}  {rows[-1]['hours']:.3f} h  "
              f"top-1 {rows[-1]['top1']:.3f}  (global {rows[-1]['global_top1']:.3f}, "
              f"checkpoint BN {rows[-1]['top1_ckpt_bn']:.3f})", flush=True)

    arch = load_config("quickstart", [*args.sets]).trunk
    if "random" in trunks:
        add("random", random_trunk(arch, seed=args.seed), 0, {})
    for name, run_dir in trunks.items():
        if run_dir is None:
            continue
        store = CheckpointStore(open_storage(str(run_dir)))
        entries = [e for e in store.list_checkpoints() if e.get("milestone")]
        last = store.list_checkpoints()[-1]
        for entry in entries + ([last] if not entries or last["step"] > entries[-1]["step"]
                                else []):
            add(name, load_entry(store, entry), entry["step"], pretext_at(run_dir, entry["step"]))
    return rows


def table(rows: list[dict]) -> str:
    head = ("| trunk | step | device-h | top-1 | top-5 | top-1 (global pool) | "
            "top-1 (checkpoint BN statistics) | pretext on held-out items (chance) |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        pretext = "; ".join(f"{t[:8]} {h['metric']} {h['value']:.2f} ({h['chance']:.2f})"
                            for t, h in r["pretext"].items())
        lines.append(f"| {r['trunk']} | {r['step']} | {r['hours']:.3f} | {r['top1']:.3f} | "
                     f"{r['top5']:.3f} | {r['global_top1']:.3f} | {r['top1_ckpt_bn']:.3f} | "
                     f"{pretext or '-'} |")
    return "\n".join(lines)


def targets(rows: list[dict], *, gain: float, key: str = "top1") -> list[str]:
    """Issue 9's targets at the last milestone of each trunk, as PASS/MISS lines ("rises" is
    checked as last milestone above the first: the curve between may dip); `key`: which
    probe's top-1."""
    final = {}
    for r in rows:
        final[r["trunk"]] = r  # rows are in step order per trunk
    out = []
    if "random" not in final:
        return out
    base = final["random"][key]
    singles = {t: final[t][key] for t in TASKS if t in final}
    for t, v in singles.items():
        out.append(f"{'PASS' if v >= base else 'MISS'} {t} >= random: {v:.3f} vs {base:.3f}")
    for combo in ("naive", "lasso"):
        if combo not in final:
            continue
        v = final[combo][key]
        if singles:
            best = max(singles, key=singles.get)
            out.append(f"{'PASS' if v >= singles[best] else 'MISS'} {combo} >= best single "
                       f"({best}): {v:.3f} vs {singles[best]:.3f}")
        out.append(f"{'PASS' if v >= base + gain else 'MISS'} {combo} >= random + {gain:.2f}: "
                   f"{v:.3f} vs {base + gain:.3f}")
        curve = [r[key] for r in rows if r["trunk"] == combo]
        out.append(f"{'PASS' if curve[-1] > curve[0] else 'MISS'} {combo} last milestone above "
                   "the first: "
                   + " -> ".join(f"{v:.3f}" for v in curve))
    return out


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["trunk"] for r in rows):
        pts = [(r["hours"], r["top1"]) for r in rows if r["trunk"] == name]
        if name == "random":
            ax.axhline(pts[0][1], color="k", ls="--", label="random init")
        else:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("pre-training device-hours")
    ax.set_ylabel("caltech10 test top-1 (grid linear probe)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 15 minutes on 2 CPU cores")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, help="runs, caches and results (default: a new folder "
                                              "under runs/transfer-*)")
    ap.add_argument("--trunks", default=",".join(TRUNKS))
    ap.add_argument("--minutes", type=float, help="pre-training budget per trunk")
    ap.add_argument("--milestones", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1,
                    help="pre-training runs at once (each one device: on a CPU, one core each)")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    if args.jobs < 1 or (gpu and args.jobs > 1):
        sys.exit(f"--jobs {args.jobs}: at least 1, and 1 on a GPU (runs sharing one GPU would "
                 "not get comparable device-hours)")
    args.minutes = args.minutes or (5.0 if gpu else 1.2 if args.quick else 7.0)
    args.sets = GPU_SETS if gpu else CPU_SETS
    args.data = args.data.resolve()  # prep's staging folder links to it: a relative path would dangle
    args.work = (args.work or ROOT / "runs" / f"transfer-{time.strftime('%Y%m%d-%H%M%S')}")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    names = [t.strip() for t in args.trunks.split(",") if t.strip()]
    unknown = sorted(set(names) - set(TRUNKS))
    if unknown:
        sys.exit(f"unknown trunks {unknown}; choose from {', '.join(TRUNKS)}")
    start = time.perf_counter()
    motion = prepare_motion(args.data, args.work, frames_per_video=12 if args.quick else 24)
    runs = pretrain_all(names, args=args, motion=motion)
    print("probing (caltech10 train -> test)", flush=True)
    rows = probe_all(runs, args=args)
    text = table(rows)
    gain = 0.10 if gpu else 0.05
    checks = (["targets, headline probe (BatchNorm statistics recomputed on the probe's images):"]
              + targets(rows, gain=gain)
              + ["targets, the same probe on the checkpoint's BatchNorm statistics:"]
              + targets(rows, gain=gain, key="top1_ckpt_bn"))
    print(f"\n{text}\n\n" + "\n".join(checks))
    print(f"\n{args.device}, {args.minutes:g} min per trunk, {len(names)} trunks, "
          f"total {(time.perf_counter() - start) / 60:.1f} min; results in {args.work}")
    plot(rows, args.work / "transfer.png")
    (args.work / "transfer.json").write_text(json.dumps(
        {"rows": rows, "targets": checks, "device": args.device, "minutes": args.minutes,
         "date": time.strftime("%Y-%m-%d")}, indent=1))
    (args.work / "transfer.md").write_text(text + "\n\n" + "\n".join(checks) + "\n")


if __name__ == "__main__":
    main()
