"""Run the Kubeflow pipeline on this machine: kfp.local's SubprocessRunner runs every component
as a local process in this Python environment, training uses the local launcher
(`mtssl launch --local`) on the embedded default data, and checkpoints stay on local disk.

  python pipelines/run_local.py                                  # train + report, no suites
  python pipelines/run_local.py --imagenet-data ../shared/data/caltech10
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/pipeline-local"),
                    help="run directory, checkpoints and KFP outputs (default: %(default)s)")
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="extra config override; repeatable")
    ap.add_argument("--steps", type=int, default=60, help="schedule.max_steps (default: 60)")
    ap.add_argument("--milestone-hours", type=float, default=0.01,
                    help="milestones.every_gpu_hours: named checkpoints to evaluate "
                         "(device-hours; default %(default)s)")
    ap.add_argument("--imagenet-data", help="ImageFolder train/ + val/ or test/ (suite imagenet)")
    ap.add_argument("--pascal-data", help="VOC devkit layout (suite pascal)")
    ap.add_argument("--nyu-data", help="NYU RGB + depth layout (suite nyu)")
    ap.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from kfp import local
    sys.path.insert(0, str(HERE))
    from mtssl_pipeline import mtssl_pipeline
    out = args.out.resolve()
    data = {"imagenet": args.imagenet_data, "pascal": args.pascal_data, "nyu": args.nyu_data}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp"),
               raise_on_error=True)
    run = mtssl_pipeline(
        config=args.config, launcher="local", data="embedded", storage=str(out / "storage"),
        overrides=[f"output.dir={out / 'run'}", f"schedule.max_steps={args.steps}",
                   f"milestones.every_gpu_hours={args.milestone_hours}", "output.report=false",
                   "output.progress=false", *args.overrides],
        eval_sets=[s for s, d in data.items() if d],
        **{f"{s}_data": str(Path(d).resolve()) for s, d in data.items() if d},
        eval_settings="smoke", random_baseline=not args.no_random)
    del run  # the pipeline has no outputs of its own; its stages wrote under pipeline_root
    report = sorted((out / "kfp").glob("mtssl-*/report"))[-1]
    print(f"report (KFP HTML artifact): {report / 'page'}\n"
          f"summary (KFP Markdown artifact): {report / 'markdown'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
