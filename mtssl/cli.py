"""The `mtssl` command. Each subcommand imports its module only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

# OpenMP threads that spin while waiting make every step many times slower as soon as another
# busy process shares the cores (measured: a conv+BN block took 109 ms instead of 9.6 ms on 2
# loaded cores); passive waiting costs little on an idle machine. Set before torch is imported;
# an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mtssl import __version__

# Modules that add their own subcommands: each defines add_commands(sub) and keeps heavy
# imports inside its handlers, so `mtssl --help` stays fast.
COMMAND_MODULES: list[str] = [
    "mtssl.prep.commands",
    "mtssl.distributed.commands",
    "mtssl.eval.commands",
]

EPILOG = """examples:
  mtssl quickstart                                   # tiny 4-task run on embedded data + report
  mtssl train --config paper --set data.images=/data/imagenet/train
  mtssl train --config quickstart --set trunk.width=0.25 --set schedule.max_steps=50
  mtssl train --config runs/quickstart/config.yaml --resume
  mtssl config --config paper --set trunk.depth=50   # validate and print the resolved config
"""


def add_config_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--config", default=default,
                   help=f"built-in config name (quickstart, paper) or a YAML file (default: {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value by dotted key, e.g. --set trunk.depth=50; "
                        "repeatable; values are parsed as YAML")


def add_start_args(p: argparse.ArgumentParser) -> None:
    """How a run starts: shared by the commands that own (or launch) a run's checkpoints."""
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest good checkpoint in the run's storage")
    p.add_argument("--force", action="store_true",
                   help="start a new run where one exists: the old one is moved aside to "
                        "<run dir>.old-<time> (nothing is deleted)")
    p.add_argument("--allow-changed", default="", metavar="KEY[,KEY...]",
                   help="with --resume: hyper-parameters that may differ from the checkpoint's "
                        "(tasks.<t>.lr, tasks.<t>.weight, optimizer.*, lasso.l1), e.g. to "
                        "continue a diverged run with a lower learning rate")
    p.add_argument("--create-bucket", action="store_true",
                   help="create the S3 bucket of output.storage if it does not exist")


def add_resume_args(p: argparse.ArgumentParser) -> None:
    """The start arguments and --no-report, for the commands that own a run's checkpoints."""
    add_start_args(p)
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")


def start_options(args) -> dict:
    """TrainingRun's keyword arguments from the start arguments."""
    from mtssl.config import ConfigError
    if args.resume and args.force:
        raise ConfigError("", "--resume continues the run, --force starts a new one: pick one")
    allowed = tuple(k.strip() for k in args.allow_changed.split(",") if k.strip())
    if allowed and not args.resume:
        raise ConfigError("", "--allow-changed only applies with --resume")
    return dict(resume=args.resume, force=args.force, allow_changed=allowed,
                create_bucket=args.create_bucket)


def start_flags(args) -> list[str]:
    """The start arguments as command-line flags, for a child process."""
    opts = start_options(args)
    return ([f"--{k.replace('_', '-')}" for k in ("resume", "force", "create_bucket") if opts[k]]
            + (["--allow-changed", ",".join(opts["allow_changed"])] if opts["allow_changed"] else []))


def load(args):
    import mtssl.tasks  # noqa: F401  registers the tasks whose sections the config holds
    from mtssl.config import load_config
    overrides = list(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"output.dir={args.out}")
    return load_config(args.config, overrides)


def cmd_config(args) -> int:
    import yaml

    from mtssl.config import to_dict
    print(yaml.safe_dump(to_dict(load(args)), sort_keys=False), end="")
    return 0


def cmd_train(args) -> int:
    from mtssl.signals import StopOnSignal
    from mtssl.train import Trainer
    cfg = load(args)
    hint = f"continue with: mtssl train --config {cfg.run_dir / 'config.yaml'} --resume"
    with StopOnSignal() as stop:
        trainer = Trainer(cfg, **start_options(args))
        stop.bind(trainer.request_stop)
        state = trainer.train()
    if stop.received:
        print(f"mtssl: stopped by {stop.received[0]} at step {state.step} with a final "
              f"checkpoint; run directory: {cfg.run_dir}; {hint}")
        return 0
    if cfg.output.report and not args.no_report:
        from mtssl.pretrain_report import write_report
        path = write_report(cfg.run_dir)
        print(f"report: {path}")
    print(f"run directory: {cfg.run_dir} (step {state.step}); {hint}")
    return 0


def cmd_report(args) -> int:
    from mtssl.pretrain_report import write_report
    print(f"report: {write_report(args.run_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtssl", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Multi-task self-supervised pre-training of one ResNet-v2 trunk "
                    "(relative position, colorization, exemplar, motion segmentation).")
    parser.add_argument("--version", action="version", version=f"mtssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="pre-train the trunk on the enabled tasks (one process)",
                       description="Train all enabled tasks on one trunk in this process. Writes "
                                   "config.yaml, metrics.jsonl, checkpoints and a report to the "
                                   "run directory (output.dir).")
    add_config_args(p, "quickstart")
    p.add_argument("--out", help="run directory (same as --set output.dir=...)")
    add_resume_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quickstart", help="the README's main job: tiny 4-task run + report",
                       description="Train the tiny `quickstart` config on the embedded default "
                                   "data (real photos bundled in scikit-image, synthetic motion "
                                   "clips made from them) on this machine, then write a report.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set schedule.max_steps=50")
    p.add_argument("--out", help="run directory (default runs/quickstart)")
    add_start_args(p)
    p.set_defaults(func=cmd_train, config="quickstart", no_report=False)

    p = sub.add_parser("config", help="validate a config and print it resolved",
                       description="Load a config with overrides, check every key, type and "
                                   "range, and print the resolved YAML.")
    add_config_args(p, "quickstart")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("report-pretrain", help="(re)write the pre-training report of a run",
                       description="Loss curves, pretext metrics, colorized samples, predicted "
                                   "motion masks and the lasso alpha heatmap of a run directory.")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def fail(err: BaseException, *, verbose: bool, message: str | None = None) -> None:
    """One line for the user (`message`, default the error's); the traceback only with -v."""
    if verbose:
        traceback.print_exception(err)
    print(f"mtssl: {err if message is None else message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mtssl.checkpoint import CheckpointError
    from mtssl.config import ConfigError
    from mtssl.data.stream import NoUsableData
    from mtssl.errors import UserError
    from mtssl.storage import StorageError
    from mtssl.train import TrainingError
    try:
        return args.func(args)
    except ConfigError as err:
        fail(err, verbose=args.verbose, message=f"config error: {err}")
        return 2
    except UserError as err:
        fail(err, verbose=args.verbose)
        return 2
    except (TrainingError, StorageError, CheckpointError, NoUsableData) as err:
        # Failures during the run (preflight passed): the cause, not the call stack.
        fail(err, verbose=args.verbose)
        return 1
    except KeyboardInterrupt as err:
        why = f" ({err})" if str(err) else ""
        fail(err, verbose=args.verbose, message=f"interrupted{why}; continue with --resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
