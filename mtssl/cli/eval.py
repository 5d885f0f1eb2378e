"""`mtssl eval` and `mtssl report transfer`: transfer evaluation of checkpoints, GPU-hour report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtssl.cli.common import add_set_arg
from mtssl.eval import SUITES

DEFAULT_CACHE = Path("~/.cache/mtssl/eval-features")

EVAL_EPILOG = """examples:
  mtssl eval imagenet --checkpoint runs/quickstart --data ../shared/data/caltech10
  mtssl eval imagenet --init random --arch quickstart --data ../shared/data/caltech10
  mtssl eval pascal --checkpoint s3://bucket/run/checkpoints/step_000001000.pt \\
      --data /data/VOCdevkit/VOC2007 --settings paper
  mtssl eval nyu --checkpoint runs/quickstart --data /data/nyu_export --set iterations=500

suites: imagenet (ImageFolder train/ + val/ or test/: linear probe on the frozen trunk),
  pascal (VOC devkit layout: Faster R-CNN C4, fine-tuned), nyu (RGB + depth layout of
  mtssl.eval.nyu: up-projection decoder, fine-tuned). --set keys are the suite's settings,
  e.g. --set epochs=10 --set lasso=true (eval-only lasso).
"""

TRANSFER_EPILOG = """examples:
  mtssl report transfer runs/quickstart --suite imagenet=../shared/data/caltech10
  mtssl report transfer runs/naive runs/lasso --suite imagenet=/data/imagenet \\
      --suite pascal=/data/VOC2007 \\
      --suite nyu=/data/nyu --settings paper --out reports/lasso
  mtssl report transfer s3://bucket/run --suite imagenet=DATA --set imagenet.epochs=5

Re-running with the same --out skips every evaluation already in its results.json.
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="transfer evaluation of a checkpoint on one suite",
                       description="Evaluate a pre-trained trunk (or a random-init baseline) on "
                                   "imagenet, pascal or nyu and print the metrics.",
                       epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=SUITES)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="SOURCE",
                        help="checkpoint file or URI (.../checkpoints/step_N.pt), run directory "
                             "or storage root (its newest checkpoint), local or s3://")
    source.add_argument("--init", choices=["random"], help="random-init baseline (needs --arch)")
    p.add_argument("--arch", metavar="CONFIG",
                   help="config (built-in name or YAML) whose trunk section is the architecture: "
                        "required with --init random; with --checkpoint, checked against it")
    p.add_argument("--data", required=True, help="the suite's data folder")
    add_eval_args(p)
    add_set_arg(p, "suite setting", "epochs=10")
    p.add_argument("--out", help="also write the result as JSON to this file")
    p.set_defaults(func=cmd_eval)


def add_transfer(sub: argparse._SubParsersAction) -> None:
    """`mtssl report transfer`, added to `report`'s subcommands by mtssl.cli.report."""
    p = sub.add_parser("transfer", help="evaluate runs' milestones; the transfer report",
                       description="Evaluate every milestone checkpoint of each run (its newest "
                                   "checkpoint if it has none) and a random-init trunk on the "
                                   "given suites, skipping what is done, then write "
                                   "results.{json,csv}, metric-vs-GPU-hours plots, the lasso "
                                   "alpha heatmap, the lasso table (runs with and without lasso "
                                   "given) and index.html.",
                       epilog=TRANSFER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directory or storage URI of a pre-training run")
    p.add_argument("--suite", dest="suites", action="append", default=[], required=True,
                   metavar="SUITE=DATA", help=f"a suite ({', '.join(SUITES)}) and its data")
    add_eval_args(p)
    add_set_arg(p, "suite setting (SUITE.KEY)", "imagenet.epochs=5")
    p.add_argument("--out", help="report folder (default: <first run>/eval-report)")
    p.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    p.set_defaults(func=cmd_transfer)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", choices=("smoke", "paper"), default="smoke",
                   help="smoke: small and quick, for tests and CPUs; paper: the documented "
                        "full-size settings for a GPU (default: smoke)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help=f"linear-probe feature cache (default: {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")


def cache_dir(args) -> Path | None:
    return None if args.no_cache else Path(args.cache_dir).expanduser()


def cmd_eval(args) -> int:
    from mtssl.eval.common import (
        EvalError,
        arch_from_config,
        load_trunk,
        random_trunk,
        run_suite,
        suite_settings,
    )
    from mtssl.train import resolve_device
    settings = suite_settings(args.suite, args.settings, args.overrides)
    try:
        expected = arch_from_config(args.arch) if args.arch else None
        if args.init == "random":
            if expected is None:
                raise EvalError("--init random needs --arch CONFIG (e.g. --arch quickstart)")
            loaded = random_trunk(expected)
        else:
            loaded = load_trunk(args.checkpoint, expected=expected)
        result = run_suite(args.suite, loaded, args.data, settings, settings_name=args.settings,
                           device=resolve_device(args.device), cache_dir=cache_dir(args))
    except EvalError as err:
        print(f"mtssl: eval: {err}", file=sys.stderr)
        return 1
    print(summary(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))
        print(f"result: {args.out}")
    return 0


def summary(r: dict) -> str:
    lines = [f"{r['suite']} ({r['settings']}) of {r['label']} [{r['checkpoint'][:22]}]"
             + (f"  -- {r['data_note']}" if r.get("data_note") else "")]
    lines += [f"  {k}: {v:.4f}" for k, v in r["metrics"].items()]
    if "per_class_ap" in r:
        lines.append("  per-class AP: " + ", ".join(f"{c} {v:.4f}"
                                                     for c, v in r["per_class_ap"].items()))
    if "constant_baseline" in r:
        lines.append("  constant-depth baseline: " + ", ".join(
            f"{k} {v:.4f}" for k, v in r["constant_baseline"].items()))
    if "extract_images_per_s" in r:
        lines.append(f"  feature extraction: {r['extract_images_per_s']:.1f} images/s"
                     + (" (cached)" if r["features_cached"] else ""))
    lines.append(f"  skipped: {r['skipped'] or 'none'}; {r['seconds']:.1f} s")
    return "\n".join(lines)


def parse_pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    from mtssl.config import ConfigError
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError("", f"{what} {item!r} must look like NAME=VALUE")
        pairs.append((key.strip(), value))
    return pairs


def cmd_transfer(args) -> int:
    from mtssl.config import ConfigError
    from mtssl.eval.common import EvalError
    from mtssl.eval.report import write_report
    from mtssl.train import resolve_device
    suites: dict[str, str | Path] = dict(parse_pairs(args.suites, "--suite"))
    overrides: dict[str, list[str]] = {}
    for key, value in parse_pairs(args.overrides, "--set"):
        suite, dot, rest = key.partition(".")
        if not dot or suite not in SUITES:
            raise ConfigError(key, f"report overrides are SUITE.KEY=VALUE with SUITE one of "
                                   f"{', '.join(SUITES)}")
        overrides.setdefault(suite, []).append(f"{rest}={value}")
    first = args.runs[0]
    out = Path(args.out) if args.out else (
        Path(first) / "eval-report" if "://" not in first else Path("eval-report"))
    try:
        page = write_report(args.runs, suites, out=out, settings_name=args.settings,
                            overrides=overrides, device=resolve_device(args.device),
                            cache_dir=cache_dir(args), random_baseline=not args.no_random)
    except EvalError as err:
        print(f"mtssl: report transfer: {err}", file=sys.stderr)
        return 1
    print(f"report: {page}")
    return 0
