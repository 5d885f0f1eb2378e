"""`mtssl prep-merge`: N partitions prepared with `mtssl prep --partition K/N` into one dataset.

Nothing is copied: each partition's shards stay where its prep wrote them
(`images/part-K-of-N/shard-*.tar`, ...) and the merged manifest.json names them all, after
checking every shard's sha256 and size against its partition's manifest. Counts, skipped items
and mask tallies are summed, so the manifest describes the same items a one-run prep of the
input would hold (shards and samples are ordered by partition, not by input path).
manifest.json is written last and only when every partition checks out; a failed merge leaves
whatever was there before.
"""

from __future__ import annotations

import collections
import json
import re

from mtssl.data.shards import MANIFEST, read_manifest
from mtssl.prep.dataset import PARTITIONS, part_name
from mtssl.prep.shards import PrepError
from mtssl.storage import NotFound, Storage, open_storage

_NAME = re.compile(re.escape(PARTITIONS) + r"part-(\d{4})-of-(\d{4})\.json")


def _partitions(storage: Storage, uri: str) -> list[dict]:
    """The N partition manifests of one partitioning, in order; PrepError if any is missing."""
    found: dict[int, set[int]] = collections.defaultdict(set)
    for key in storage.list(PARTITIONS):
        if m := _NAME.fullmatch(key):
            found[int(m[2])].add(int(m[1]))
    if not found:
        raise PrepError(f"no partitions under {uri}: run `mtssl prep INPUT {uri} --partition "
                        "K/N` for K = 1..N first")
    if len(found) > 1:
        raise PrepError(f"{uri} holds partitions of {sorted(found)} partitionings: re-prepare "
                        "into a new output (or with --overwrite) with one N")
    (n, ks), = found.items()
    missing = sorted(set(range(1, n + 1)) - ks)
    if missing:
        raise PrepError(f"partition(s) {', '.join(map(str, missing))} of {n} are not prepared "
                        f"in {uri} yet: run `mtssl prep INPUT {uri} --partition K/{n}` for them")
    return [read_manifest(storage, f"{PARTITIONS}{part_name((k, n))}.json")
            for k in range(1, n + 1)]


def _check_shards(storage: Storage, manifest: dict) -> None:
    for stream in ("images", "frames"):
        for s in manifest[stream]["shards"]:
            try:
                sha, size = storage.sha256(s["tar"])
            except NotFound as err:
                raise PrepError(f"partition {manifest['partition'][0]}: {err}; re-run its "
                                "prep") from None
            if not storage.exists(s["index"]):
                raise PrepError(f"partition {manifest['partition'][0]}: no "
                                f"{storage.uri(s['index'])}; re-run its prep")
            if (sha, size) != (s["sha256"], s["bytes"]):
                raise PrepError(f"partition {manifest['partition'][0]}: {storage.uri(s['tar'])} "
                                "does not match its manifest (changed or damaged since); re-run "
                                "that partition's prep")


def _summed(parts: list[dict], stream: str, keys: tuple[str, ...]) -> dict:
    return {k: sum(p[stream][k] for p in parts) for k in keys}


def merge(uri: str) -> dict:
    """Write and return the merged manifest of the partitions prepared in `uri`."""
    storage = open_storage(uri)
    parts = _partitions(storage, uri)
    first = parts[0]
    for p in parts[1:]:
        if p["fingerprint"] != first["fingerprint"]:
            raise PrepError(f"partition {p['partition'][0]} of {uri} was prepared with other "
                            "options than partition 1; prepare it again with the same ones")
    for p in parts:
        _check_shards(storage, p)
    dropped: collections.Counter = collections.Counter()
    for p in parts:
        dropped.update(p["frames"]["masks"]["dropped"])
    skipped = [item for p in parts for item in p["skipped"]["items"]]
    manifest = {
        "format": first["format"], "version": first["version"],
        "fingerprint": first["fingerprint"], "config": first["config"],
        "partitions": len(parts),
        "images": {**_summed(parts, "images", ("count", "bytes", "files", "grayscale")),
                   "shards": [s for p in parts for s in p["images"]["shards"]]},
        "frames": {**_summed(parts, "frames", ("count", "bytes", "clips")),
                   "masks": {"kept": sum(p["frames"]["masks"]["kept"] for p in parts),
                             "dropped": dict(sorted(dropped.items()))},
                   "shards": [s for p in parts for s in p["frames"]["shards"]]},
        "skipped": {"count": len(skipped),
                    "by_reason": dict(sorted(collections.Counter(s[1] for s in skipped).items())),
                    "items": skipped},
        # the walk's findings are the same for every partition; partition 1 lists them
        "ignored_files": first["ignored_files"],
    }
    storage.put_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest
