"""`mtssl prep`: a folder of images, videos and frame folders -> a prepared dataset in storage.

Two passes over the same deterministic walk: images into `images/` shards, then videos and
frame folders into `frames/` shards (frame + motion mask). Items are processed in a streaming
fashion (one shard assembled at a time), shards are closed at a fixed size, and the manifest is
written last, atomically. Re-running verifies the shards already written (sha256) and the
input they cover, keeps them, and continues after them: an interrupted prep resumes, and a
finished one is reproduced byte for byte without duplicates.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

from mtssl.config import to_dict
from mtssl.data.shards import DATASET_FORMAT, MANIFEST, VERSION, read_manifest
from mtssl.prep.options import RUN_SETTINGS, PrepConfig, fingerprint
from mtssl.prep.shards import (
    ItemResult,
    PrepError,
    ShardWriter,
    Stats,
    clean_stale_temps,
    completed_shards,
    input_line,
    temp_folder,
)
from mtssl.prep.walk import Item, WalkReport, walk
from mtssl.procs import die_with_parent
from mtssl.storage import LocalStorage, Storage, open_storage
from mtssl.validation import ConfigError

log = logging.getLogger("mtssl.prep")
PARTITIONS = "partitions/"  # a partition's manifest: partitions/part-K-of-N.json


@dataclass
class StreamResult:
    shards: list[dict] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)


def _process(fn: Callable[[Item, PrepConfig], ItemResult], item: Item,
             cfg: PrepConfig) -> ItemResult:
    """Any failure on one item becomes a skip of that item, never the end of the prep."""
    try:
        return fn(item, cfg)
    except ImportError:  # a missing dependency is this machine's problem, not the item's
        raise
    except MemoryError:
        return ItemResult(skipped=[(item.rel, "out_of_memory", "decoding ran out of memory")])
    except Exception as err:  # noqa: BLE001 - arbitrary input trips arbitrary decoder errors
        log.debug("item %s failed", item.rel, exc_info=True)
        return ItemResult(skipped=[(item.rel, "error", f"{type(err).__name__}: {err}")])


def _worker_init(parent: int) -> None:
    # A prep killed outright (SIGKILL, OOM) must not leave its workers waiting forever.
    die_with_parent(parent)
    # One process per core already: threads inside one would only fight the others.
    import torch
    torch.set_num_threads(1)
    try:
        import cv2
    except ImportError:  # the prep extra is only needed for videos; images prep without it
        return
    cv2.setNumThreads(1)


def ordered_map(fn, items: Iterator[tuple[int, Item]], cfg: PrepConfig
                ) -> Iterator[tuple[int, Item, ItemResult]]:
    """(ordinal, item, result) in input order; with workers, at most 4 per worker in flight, so
    memory stays bounded however long the input is."""
    workers = cfg.processes
    if workers == 1:
        for ordinal, item in items:
            yield ordinal, item, _process(fn, item, cfg)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: children of a process that has started torch's threads can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        window: collections.deque = collections.deque()
        for ordinal, item in items:
            window.append((ordinal, item, pool.submit(_process, fn, item, cfg)))
            if len(window) >= 4 * workers:
                o, it, fut = window.popleft()
                yield o, it, fut.result()
        while window:
            o, it, fut = window.popleft()
            yield o, it, fut.result()


def _verify_input(done, items: Iterator[tuple[int, Item]], stream: str) -> None:
    """Consume the items the completed shards cover, checking they are the same input."""
    for c in done:
        first, end = c.entry["items"]
        digest = hashlib.sha256()
        for _ in range(end - first):
            nxt = next(items, None)
            if nxt is None:
                raise PrepError(f"the input has fewer {stream} items than {c.entry['tar']} "
                                "covers: it changed since that shard was written; prepare into "
                                "a new output or pass --overwrite")
            digest.update(input_line(nxt[1].rel, nxt[1].size))
        if digest.hexdigest() != c.digest:
            raise PrepError(f"input items {first}..{end - 1} ({stream}) differ from those "
                            f"{c.entry['tar']} was made from (files added, removed or resized); "
                            "prepare into a new output or pass --overwrite")


def prepare_stream(stream: str, items: Iterator[Item], fn, *, storage: Storage, cfg: PrepConfig,
                   fp: str, tmp: Path, bar=None) -> StreamResult:
    done = completed_shards(storage, stream, fp)
    out = StreamResult(shards=[c.entry for c in done])
    for c in done:
        out.stats.merge(c.stats)
    numbered = enumerate(items)
    _verify_input(done, numbered, stream)
    writer, end = None, done[-1].entry["items"][1] if done else 0
    if done:
        log.info("%s: kept %d verified shard(s) covering %d item(s)", stream, len(done), end)
        if bar is not None:
            bar.update(end)
    try:
        for ordinal, item, result in ordered_map(fn, numbered, cfg):
            if writer is None:
                writer = ShardWriter(storage=storage, stream=stream, number=len(out.shards),
                                     first=ordinal, fingerprint=fp, tmp_dir=tmp)
            writer.add(item.rel, item.size, result)
            end = ordinal + 1
            if bar is not None:
                bar.update(1)
            if writer.size >= cfg.shard_bytes or writer.stats.samples >= cfg.shard_max_items:
                out.shards.append(writer.finish(end))
                out.stats.merge(writer.stats)
                writer = None
        if writer is not None and writer.stats.samples:
            out.shards.append(writer.finish(end))
            out.stats.merge(writer.stats)
        elif writer is not None:  # only unusable items since the last shard: no tar for them
            out.stats.merge(writer.discard())
        writer = None
    finally:
        if writer is not None:
            writer.discard()
    return out


def _open_output(uri: str) -> Storage:
    if urlparse(uri).scheme == "s3":
        return open_storage(uri, create_bucket=True)
    return open_storage(uri)


def part_name(part: tuple[int, int]) -> str:
    """A partition's folder under each stream, and its manifest's name under partitions/."""
    return f"part-{part[0]:04d}-of-{part[1]:04d}"


def _clear(storage: Storage, part: tuple[int, int] | None) -> None:
    if part is None:
        keys = storage.list("images/") + storage.list("frames/") + storage.list(PARTITIONS)
    else:
        name = part_name(part)
        keys = storage.list(f"images/{name}/") + storage.list(f"frames/{name}/") + [
            f"{PARTITIONS}{name}.json"]
    # A merged manifest names every partition's shards: once any of them goes, it is wrong.
    for key in keys + [MANIFEST]:
        storage.delete(key)


def _walk(cfg: PrepConfig, storage: Storage, report: WalkReport | None = None):
    exclude = cfg.exclude
    if isinstance(storage, LocalStorage):  # an output inside the input is not input
        root = Path(cfg.input).resolve()
        if storage.root.is_relative_to(root) and storage.root != root:
            exclude += (storage.root.relative_to(root).as_posix(),)
    return walk(cfg.input, exclude=exclude, frame_pattern=cfg.frame_pattern,
                min_folder_frames=cfg.min_folder_frames, report=report)


def _share(items: Iterator[Item], stream: str, part: tuple[int, int] | None) -> Iterator[Item]:
    """The stream's items that are this partition's: every N-th, from the K-th on. Dealing them
    out in turn, per stream, gives every partition a like mix of small and large inputs."""
    mine = (i for i in items if i.stream == stream)
    if part is None:
        return mine
    k, n = part
    return (item for j, item in enumerate(mine) if j % n == k - 1)


def _check_output(storage: Storage, cfg: PrepConfig, fp: str) -> None:
    """Refuse to mix: other options, or a one-run dataset and partitions in one output."""
    part = cfg.part
    own = MANIFEST if part is None else f"{PARTITIONS}{part_name(part)}.json"
    if storage.exists(own) and read_manifest(storage, own)["fingerprint"] != fp:
        raise PrepError(f"{storage.uri(own)} was prepared with other options; prepare into a "
                        "new output or pass --overwrite")
    if part is None and storage.list(PARTITIONS):
        raise PrepError(f"{cfg.output} holds a dataset prepared in partitions: prepare "
                        "with --partition K/N and `mtssl prep-merge`, or pass --overwrite")
    if part is not None and storage.exists(MANIFEST) and not storage.list(PARTITIONS):
        raise PrepError(f"{cfg.output} holds a dataset prepared in one run: prepare it "
                        "without --partition, or pass --overwrite")


def prepare(cfg: PrepConfig, *, overwrite: bool = False) -> dict:
    """Prepare `cfg.input` (or its partition `cfg.partition`) into `cfg.output`; returns the
    manifest, written to manifest.json (partitions/part-K-of-N.json for a partition)."""
    from mtssl.prep.samples import prepare_image
    from mtssl.prep.video import prepare_clip

    if not Path(cfg.input).is_dir():
        raise ConfigError("prep.input", f"not a folder: {cfg.input}")
    storage, fp, part = _open_output(cfg.output), fingerprint(cfg), cfg.part
    tmp = temp_folder(storage, cfg.tmp_dir)
    clean_stale_temps(tmp)
    if overwrite:
        _clear(storage, part)
    else:
        _check_output(storage, cfg, fp)
    prefix = "" if part is None else f"/{part_name(part)}"
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        total = sum(1 for s in ("images", "frames") for _ in _share(_walk(cfg, storage), s, part))
        bar = tqdm(total=total, unit="file", desc="prep", dynamic_ncols=True, mininterval=0.5)
    # What the walk cannot use is listed once: by a one-run prep, or by partition 1.
    report, results = WalkReport(), {}
    listed = report if part is None or part[0] == 1 else WalkReport()
    try:
        for stream, fn in (("images", prepare_image), ("frames", prepare_clip)):
            found = _walk(cfg, storage, listed if stream == "images" else WalkReport())
            if bar is not None:
                bar.set_description(f"prep {stream}")
            results[stream] = prepare_stream(stream + prefix, _share(found, stream, part), fn,
                                             storage=storage, cfg=cfg, fp=fp, tmp=tmp, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    manifest = build_manifest(cfg, fp, results["images"], results["frames"], report)
    if part is None:
        storage.put_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    else:
        manifest["partition"] = list(part)
        storage.put_bytes(f"{PARTITIONS}{part_name(part)}.json",
                          json.dumps(manifest, indent=1).encode())
    return manifest


def build_manifest(cfg: PrepConfig, fp: str, images: StreamResult, frames: StreamResult,
                   report: WalkReport) -> dict:
    skipped = [list(p) for p in report.problems] + images.stats.skipped + frames.stats.skipped
    masks = frames.stats.masks
    return {
        "format": DATASET_FORMAT, "version": VERSION, "fingerprint": fp,
        "config": {k: v for k, v in to_dict(cfg).items() if k not in RUN_SETTINGS},
        "images": {"count": sum(s["count"] for s in images.shards),
                   "bytes": sum(s["bytes"] for s in images.shards), "files": images.stats.items,
                   "grayscale": images.stats.grayscale, "shards": images.shards},
        "frames": {"count": sum(s["count"] for s in frames.shards),
                   "bytes": sum(s["bytes"] for s in frames.shards), "clips": frames.stats.items,
                   "masks": {"kept": masks.get("kept", 0),
                             "dropped": {k.split(":", 1)[1]: v for k, v in sorted(masks.items())
                                         if k.startswith("dropped:")}},
                   "shards": frames.shards},
        "skipped": {"count": len(skipped),
                    "by_reason": dict(sorted(collections.Counter(s[1] for s in skipped).items())),
                    "items": skipped},
        "ignored_files": dict(sorted(report.ignored.items())),
    }


def summary(manifest: dict, uri: str) -> str:
    im, fr, sk = manifest["images"], manifest["frames"], manifest["skipped"]
    mb = (im["bytes"] + fr["bytes"]) / 2**20
    lines = [f"prepared {uri} ({mb:.1f} MiB)",
             f"  images: kept {im['count']} of {im['files']} files in {len(im['shards'])} "
             f"shard(s) ({im['grayscale']} grayscale)",
             f"  frames: kept {fr['count']} frame/mask pairs from {fr['clips']} videos/frame "
             f"folders in {len(fr['shards'])} shard(s); frames dropped: "
             + (", ".join(f"{k} {v}" for k, v in fr["masks"]["dropped"].items()) or "none"),
             f"  skipped: {sk['count']}" + (" (" + ", ".join(
                 f"{k} {v}" for k, v in sk["by_reason"].items()) + ")" if sk["count"] else "")]
    if manifest["ignored_files"]:
        lines.append("  ignored (not images or videos): " + ", ".join(
            f"{k} {v}" for k, v in manifest["ignored_files"].items()))
    return "\n".join(lines)
