"""`mtssl report pretrain RUN` and `mtssl report transfer RUN... --suite ...`: the two reports."""

from __future__ import annotations

import argparse

from mtssl.cli.eval import add_transfer


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a run's report: pretrain or transfer",
                       description="pretrain: loss curves, pretext metrics and samples of one "
                                   "run; transfer: evaluate runs' milestones on the transfer "
                                   "suites and plot them against GPU-hours.")
    kinds = p.add_subparsers(dest="report", required=True, metavar="KIND")
    q = kinds.add_parser("pretrain", help="(re)write the pre-training report of a run",
                         description="Loss curves, pretext metrics, colorized samples, predicted "
                                     "motion masks and the lasso alpha heatmap of a run "
                                     "directory.")
    q.add_argument("run_dir")
    q.set_defaults(func=cmd_pretrain)
    add_transfer(kinds)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mtssl.pretrain_report import write_report
    print(f"report: {write_report(args.run_dir)}")
    return 0


def upgrade_argv(argv: list[str], warn) -> list[str]:
    """The old spellings (`report-pretrain RUN`, `report RUN --suite ...`), hidden from --help,
    rewritten to the current ones, with one line saying so."""
    if argv[:1] == ["report-pretrain"]:
        new = ["report", "pretrain", *argv[1:]]
    elif (argv[:1] == ["report"] and len(argv) > 1
          and argv[1] not in ("pretrain", "transfer", "-h", "--help")):
        new = ["report", "transfer", *argv[1:]]
    else:
        return argv
    warn(f"mtssl: `mtssl {argv[0]}` is deprecated; use `mtssl {' '.join(new[:2])}`")
    return new
