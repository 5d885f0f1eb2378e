"""The `mtssl prep` command: every PrepConfig option is a flag (`short_side` -> --short-side)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

EPILOG = """examples:
  mtssl prep /data/raw /data/prepared --short-side 256   # every usable CPU
  mtssl prep /data/raw s3://bucket/datasets/v1 --shard-mb 512   # S3 settings: MTSSL_S3_* env
  mtssl prep /data/davis/JPEGImages/480p prepared/davis --frames-per-video 24
  mtssl prep /data/raw /data/prepared --partition 2/4    # one of 4 pods; then:
  mtssl prep-merge /data/prepared
  mtssl train --set data.images=/data/prepared --set data.frames=/data/prepared
Re-running the same command verifies the finished shards, continues an interrupted prep and
rewrites the manifest; it never duplicates samples.
"""


def _fields():
    from mtssl.prep.options import PrepConfig
    return [f for f in dataclasses.fields(PrepConfig) if f.name not in ("input", "output")]


def _is_text(name: str) -> bool:
    """Options whose flag value is taken as written (a pattern like 123 stays a string)."""
    import typing

    from mtssl.prep.options import PrepConfig
    return typing.get_type_hints(PrepConfig)[name] in (str, str | None, tuple[str, ...])


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prep", help="prepare images and videos into shards (+ motion masks) for training",
        description="Resize and re-encode a folder tree of images, sample frames of its videos "
                    "and frame folders with motion masks, and write tar shards (WebDataset "
                    "naming, JSON index per shard) plus a manifest (counts, sha256, skipped "
                    "items) to a path or s3:// URI.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="folder of images, videos (mp4/avi/webm/mov) and frame folders")
    p.add_argument("output", help="path, file:// or s3://bucket/prefix for the prepared dataset")
    p.add_argument("--config", metavar="FILE", help="YAML file of prep options (flags win)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing prepared dataset at OUTPUT first")
    for f in _fields():
        flag = "--" + f.name.replace("_", "-")
        repeat = f.name == "exclude"
        # A None default is described by the option's own help text.
        default = "" if f.default is None else f" (default: {f.default!r})"
        p.add_argument(flag, dest=f.name, metavar="VALUE", action="append" if repeat else "store",
                       help=f"{f.metadata['help']}{default}")
    p.set_defaults(func=cmd_prep)
    m = sub.add_parser(
        "prep-merge", help="join the partitions of `mtssl prep --partition K/N` into one dataset",
        description="Check every shard of the N partitions prepared in OUTPUT against its "
                    "partition's manifest and write OUTPUT's manifest.json naming them all "
                    "(summed counts and skipped items); nothing is copied.",
        epilog="example:\n  for k in 1 2 3 4; do mtssl prep /data/raw /data/prepared "
               "--partition $k/4; done\n  mtssl prep-merge /data/prepared",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("output", help="path, file:// or s3://bucket/prefix holding the partitions")
    m.set_defaults(func=cmd_merge)


def options(args) -> dict:
    """Prep options from --config and the flags; values are parsed as YAML, unvalidated."""
    import yaml

    from mtssl.config import read_yaml
    data = read_yaml(args.config) if args.config else {}
    data.update(input=args.input, output=args.output)
    for f in _fields():
        value = getattr(args, f.name)
        if value is None:
            continue
        data[f.name] = value if _is_text(f.name) else yaml.safe_load(value)
    return data


def cmd_prep(args) -> int:
    from mtssl.config import build
    from mtssl.data.shards import PreparedDatasetError
    from mtssl.prep.dataset import prepare, summary
    from mtssl.prep.options import PrepConfig
    from mtssl.prep.shards import PrepError
    from mtssl.storage import StorageError

    cfg = build(PrepConfig, options(args), "prep")
    try:
        manifest = prepare(cfg, overwrite=args.overwrite)
    except (PrepError, PreparedDatasetError, StorageError) as err:
        print(f"mtssl prep: {err}", file=sys.stderr)
        return 1
    print(summary(manifest, cfg.output))
    return 0


def cmd_merge(args) -> int:
    from mtssl.data.shards import PreparedDatasetError
    from mtssl.prep.dataset import summary
    from mtssl.prep.merge import merge
    from mtssl.prep.shards import PrepError
    from mtssl.storage import StorageError

    try:
        manifest = merge(args.output)
    except (PrepError, PreparedDatasetError, StorageError) as err:
        print(f"mtssl prep-merge: {err}", file=sys.stderr)
        return 1
    print(summary(manifest, args.output))
    return 0
