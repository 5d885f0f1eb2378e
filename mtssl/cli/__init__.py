"""The `mtssl` command: `python -m mtssl.cli` or the `mtssl` console script.

Every subcommand is defined once, in one module per command group: train (train, quickstart,
config), prep (prep, prep-merge), launch (launch --local/--k8s; Kubernetes options in k8s),
roles (coordinator, worker), eval (eval; report transfer), report (report pretrain|transfer).
Shared arguments are in common; one override syntax, `--set KEY=VALUE`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

# OpenMP threads that spin while waiting make every step many times slower as soon as another
# busy process shares the cores (measured: a conv+BN block took 109 ms instead of 9.6 ms on 2
# loaded cores); passive waiting costs little on an idle machine. Set before torch is imported;
# an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mtssl import __version__  # noqa: E402 (after the OpenMP setting)
from mtssl.cli import eval as eval_commands  # noqa: E402
from mtssl.cli import launch, prep, report, roles, train  # noqa: E402

# One module per command group; each defines add_commands(sub) and keeps heavy imports inside
# its handlers, so `mtssl --help` stays fast.
COMMAND_MODULES = (train, prep, launch, roles, eval_commands, report)

EPILOG = """examples:
  mtssl quickstart                                   # tiny 4-task run on embedded data + report
  mtssl train --config paper --set data.images=/data/imagenet/train
  mtssl train --config quickstart --set trunk.width=0.25 --set schedule.max_steps=50
  mtssl train --config runs/quickstart/config.yaml --resume
  mtssl config --config paper --set trunk.depth=50   # validate and print the resolved config
  mtssl report pretrain runs/quickstart              # rewrite a run's pre-training report
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtssl", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Multi-task self-supervised pre-training of one ResNet-v2 trunk "
                    "(relative position, colorization, exemplar, motion segmentation).")
    parser.add_argument("--version", action="version", version=f"mtssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def fail(err: BaseException, *, verbose: bool, message: str | None = None) -> None:
    """One line for the user (`message`, default the error's); the traceback only with -v."""
    if verbose:
        traceback.print_exception(err)
    print(f"mtssl: {err if message is None else message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = report.upgrade_argv(sys.argv[1:] if argv is None else list(argv),
                               lambda line: print(line, file=sys.stderr))
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
