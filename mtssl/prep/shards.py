"""Writing a prepared dataset's shards: deterministic tar files with WebDataset naming, each
followed by its JSON index (member offsets, sha256, the input range it covers, its counts).

A shard's tar is uploaded first and its index second, so an index marks a complete shard; an
interrupted prep keeps every shard whose tar still matches its index's sha256 and continues
after the input range they cover.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mtssl.data.shards import INDEX_FORMAT, VERSION, parse_index
from mtssl.procs import pid_alive
from mtssl.storage import LocalStorage, Storage

# Temporary tars: hidden from LocalStorage listings by the prefix, owned by the pid in the name.
TEMP_PREFIX = ".mtssl-tmp-prep-"

log = logging.getLogger("mtssl.prep")


class PrepError(RuntimeError):
    """The prep cannot go on (output written under other options, input changed under it)."""


@dataclass
class Sample:
    key: str  # WebDataset key: no '.' in its last path component
    members: dict[str, bytes]  # extension -> bytes, written in this order


@dataclass
class ItemResult:
    """What one input item (an image, a video, a frame folder) turned into."""
    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, reason, detail)
    grayscale: int = 0
    masks: collections.Counter = field(default_factory=collections.Counter)  # kept / dropped:*


@dataclass
class Stats:
    """Counts over a range of input items (a shard's, or the tail after the last shard)."""
    items: int = 0
    samples: int = 0
    skipped: list[list[str]] = field(default_factory=list)
    grayscale: int = 0
    masks: collections.Counter = field(default_factory=collections.Counter)

    def add(self, r: ItemResult) -> None:
        self.items += 1
        self.samples += len(r.samples)
        self.skipped.extend([list(s) for s in r.skipped])
        self.grayscale += r.grayscale
        self.masks.update(r.masks)

    def merge(self, other: Stats) -> None:
        self.items += other.items
        self.samples += other.samples
        self.skipped.extend(other.skipped)
        self.grayscale += other.grayscale
        self.masks.update(other.masks)

    def to_json(self) -> dict:
        return {"items": self.items, "samples": self.samples, "skipped": self.skipped,
                "grayscale": self.grayscale, "masks": dict(sorted(self.masks.items()))}

    @classmethod
    def from_json(cls, d: dict) -> Stats:
        # A state written before the colour prior was dropped still has "prior": ignored.
        return cls(items=d["items"], samples=d["samples"], skipped=d["skipped"],
                   grayscale=d["grayscale"], masks=collections.Counter(d["masks"]))


def input_line(rel: str, size: int) -> bytes:
    """What an input item adds to its shard's input digest."""
    return f"{rel}\0{size}\n".encode()


def shard_keys(stream: str, number: int) -> tuple[str, str]:
    base = f"{stream}/shard-{number:06d}"
    return f"{base}.tar", f"{base}.json"


def temp_folder(storage: Storage, tmp_dir: str | None) -> Path:
    """Where shards are assembled: `tmp_dir`, else next to a local output (one file system,
    found by whoever looks at the output), else the system temp folder (an S3 output)."""
    if tmp_dir is not None:
        folder = Path(tmp_dir)
    elif isinstance(storage, LocalStorage):
        folder = storage.root
    else:
        folder = Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def clean_stale_temps(folder: Path) -> None:
    """Delete temporary tars whose prep is gone (a SIGKILL runs no cleanup)."""
    for path in folder.glob(f"{TEMP_PREFIX}*.tar"):
        pid = path.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            log.info("removing %s, left by an interrupted prep", path)
            path.unlink(missing_ok=True)


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata, so the same samples always give byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key ends at the first '.' of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


class ShardWriter:
    """Covers input items [first, end) of a stream; their samples go into one tar assembled in a
    local temp file. `finish` uploads tar then index; `discard` drops the temp file."""

    def __init__(self, *, storage: Storage, stream: str, number: int, first: int,
                 fingerprint: str, tmp_dir: Path):
        self.storage, self.stream, self.number, self.first = storage, stream, number, first
        self.fingerprint = fingerprint
        self.tar_key, self.index_key = shard_keys(stream, number)
        fd, self._path = tempfile.mkstemp(
            prefix=f"{TEMP_PREFIX}{os.getpid()}-{stream.replace('/', '-')}-", suffix=".tar",
            dir=tmp_dir)
        self._file = os.fdopen(fd, "w+b")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._digest = hashlib.sha256()
        self.stats = Stats()

    @property
    def size(self) -> int:
        return self._file.tell()

    def add(self, rel: str, size: int, result: ItemResult) -> None:
        # The input digest lets a resumed prep check that the input is still the same.
        self._digest.update(input_line(rel, size))
        self.stats.add(result)
        for sample in result.samples:
            for ext, data in sample.members.items():
                self._tar.addfile(_tar_info(f"{sample.key}.{ext}", len(data)), io.BytesIO(data))

    def _members(self) -> list[dict]:
        samples: dict[str, dict[str, list[int]]] = {}
        self._file.seek(0)
        with tarfile.open(fileobj=self._file, mode="r") as tar:
            for m in tar:
                key, ext = _split_member(m.name)
                samples.setdefault(key, {})[ext] = [m.offset_data, m.size]
        return [{"key": k, "members": v} for k, v in samples.items()]

    def finish(self, end: int) -> dict:
        """Upload the tar, then its index; returns the manifest's entry for this shard."""
        self._tar.close()
        samples = self._members()
        self._file.seek(0)
        digest, size = hashlib.sha256(), 0
        while chunk := self._file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        self._file.close()
        entry = {"tar": self.tar_key, "index": self.index_key, "count": len(samples),
                 "bytes": size, "sha256": digest.hexdigest(), "items": [self.first, end]}
        index = {"format": INDEX_FORMAT, "version": VERSION, "tar": self.tar_key,
                 "sha256": entry["sha256"], "bytes": size, "fingerprint": self.fingerprint,
                 "items": {"first": self.first, "end": end, "digest": self._digest.hexdigest()},
                 "stats": self.stats.to_json(), "samples": samples}
        try:
            self.storage.put_file(self.tar_key, self._path)
            self.storage.put_bytes(self.index_key, json.dumps(index).encode())
        finally:
            os.unlink(self._path)
        return entry

    def discard(self) -> Stats:
        """Drop the temp tar (also after a failed `finish`); the range's counts remain."""
        self._tar.close()
        self._file.close()
        Path(self._path).unlink(missing_ok=True)
        return self.stats


@dataclass
class Completed:
    """A verified shard from an earlier (interrupted or finished) run."""
    entry: dict
    stats: Stats
    digest: str  # of its input range


def completed_shards(storage: Storage, stream: str, fingerprint: str) -> list[Completed]:
    """The leading run of shards whose index exists and whose tar matches it; later shard
    files (a half-written one, or from an earlier run with more input) are deleted."""
    present = set(storage.list(f"{stream}/shard-"))
    done: list[Completed] = []
    while True:
        tar_key, index_key = shard_keys(stream, len(done))
        if index_key not in present:
            break
        index = parse_index(storage.get_bytes(index_key), where=storage.uri(index_key))
        if index.get("fingerprint") != fingerprint:
            raise PrepError(f"{storage.uri(index_key)} was written with other prep options "
                            f"(fingerprint {index.get('fingerprint')}, now {fingerprint}); "
                            "prepare into a new output or pass --overwrite")
        first = done[-1].entry["items"][1] if done else 0
        sha, size = (storage.sha256(tar_key) if tar_key in present else (None, None))
        if index["items"]["first"] != first or sha != index["sha256"] or size != index["bytes"]:
            log.warning("%s: %s; it and later shards are redone", storage.uri(tar_key),
                        "missing" if sha is None else "checksum mismatch" if sha != index["sha256"]
                        else "not contiguous with the previous shard")
            break
        entry = {"tar": tar_key, "index": index_key, "count": len(index["samples"]),
                 "bytes": size, "sha256": sha,
                 "items": [index["items"]["first"], index["items"]["end"]]}
        done.append(Completed(entry, Stats.from_json(index["stats"]), index["items"]["digest"]))
    keep = {k for c in done for k in (c.entry["tar"], c.entry["index"])}
    for key in sorted(present - keep):
        storage.delete(key)
    return done
