"""What several subcommands share: the config and override arguments, how a run starts.

One override syntax everywhere: `--set KEY=VALUE` (repeatable), KEY a dotted path, VALUE parsed
as YAML. Imports stay light: `mtssl --help` builds every parser.
"""

from __future__ import annotations

import argparse


def add_set_arg(p: argparse.ArgumentParser, what: str = "config value",
                example: str = "trunk.depth=50") -> None:
    """The one override flag: `--set KEY=VALUE`, repeatable, collected in args.overrides."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one {what} by dotted key, e.g. --set {example}; "
                        "repeatable; values are parsed as YAML")


def add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help="built-in config name (quickstart, paper) or a YAML file"
                        + (f" (default: {default})" if default else ""))
    add_set_arg(p)


def add_out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run directory (same as --set output.dir=...)")


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


def start_options(args: argparse.Namespace) -> dict:
    """TrainingRun's keyword arguments from the start arguments."""
    from mtssl.config import ConfigError
    if args.resume and args.force:
        raise ConfigError("", "--resume continues the run, --force starts a new one: pick one")
    allowed = tuple(k.strip() for k in args.allow_changed.split(",") if k.strip())
    if allowed and not args.resume:
        raise ConfigError("", "--allow-changed only applies with --resume")
    return dict(resume=args.resume, force=args.force, allow_changed=allowed,
                create_bucket=args.create_bucket)


def overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides of the command line: --set values, then --out as output.dir."""
    return list(args.overrides) + ([f"output.dir={args.out}"] if getattr(args, "out", None)
                                   else [])


def load(args: argparse.Namespace):
    import mtssl.tasks  # noqa: F401  registers the tasks whose sections the config holds
    from mtssl.config import load_config
    return load_config(args.config, overrides(args))


def report_pretrain(cfg, args: argparse.Namespace) -> None:
    """The pre-training report at the end of a run, unless switched off."""
    if cfg.output.report and not args.no_report:
        from mtssl.pretrain_report import write_report
        print(f"report: {write_report(cfg.run_dir)}")
