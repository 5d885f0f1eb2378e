"""Prepared datasets (written by `mtssl prep`) as training sources.

Layout under the dataset's URI (a path, file:// or s3://):
  manifest.json                     counts, shards (sha256, bytes), skipped items
  images/shard-NNNNNN.tar           `<key>.jpg` + `<key>.json` per image (WebDataset naming)
  images/shard-NNNNNN.json          the shard's index: byte offset and size of every member
  frames/shard-NNNNNN.{tar,json}    `<key>.jpg` + `<key>.mask.png` + `<key>.json` per frame

Sources read one sample by byte range from its shard, so nothing but the manifest and a few
shard indexes is held in memory; they pickle as the URI plus the shard table, and each
process reopens storage (S3 settings from the MTSSL_S3_* environment) when it first reads.
"""

from __future__ import annotations

import collections
import json
from urllib.parse import urlparse

import numpy as np

from mtssl.data.images import BadImage, FramesWithMasks, ImageSource, load_mask, load_rgb
from mtssl.storage import NotFound, Storage, StorageError, open_storage

MANIFEST = "manifest.json"
DATASET_FORMAT = "mtssl-prepared"
INDEX_FORMAT = "mtssl-shard-index"
VERSION = 1
STREAMS = {"images": ("jpg",), "frames": ("jpg", "mask.png")}  # members a source reads


class PreparedDatasetError(ValueError):
    """Not a prepared dataset, or one whose files disagree with its manifest."""


# --- byte access ------------------------------------------------------------------------------

def read_range(storage: Storage, key: str, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of an object; StorageError if it is shorter."""
    data = storage.get_range(key, offset, length)
    if len(data) != length:
        raise StorageError(f"{storage.uri(key)}: wanted {length} bytes at {offset}, "
                           f"got {len(data)} (object truncated?)")
    return data


# --- manifest --------------------------------------------------------------------------------

def read_manifest(storage: Storage, key: str = MANIFEST) -> dict:
    """The dataset's manifest (or, by key, a partition's, which has the same form)."""
    try:
        raw = storage.get_bytes(key)
    except NotFound:
        raise PreparedDatasetError(f"no prepared dataset at {storage.uri(key)} (run "
                                   "`mtssl prep INPUT OUTPUT` first)") from None
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise PreparedDatasetError(f"{storage.uri(key)} is not valid JSON: {err}") from None
    if manifest.get("format") != DATASET_FORMAT or manifest.get("version") != VERSION:
        raise PreparedDatasetError(f"{storage.uri(key)} is not a {DATASET_FORMAT} "
                                   f"v{VERSION} manifest")
    return manifest


def is_prepared(uri: str) -> bool:
    """True for s3:// URIs (only prepared datasets live there) and for folders holding a
    manifest; plain image folders are not prepared datasets."""
    if urlparse(uri).scheme == "s3":
        return True
    return open_storage(uri).exists(MANIFEST)


def parse_index(raw: bytes, *, where: str) -> dict:
    try:
        index = json.loads(raw)
    except ValueError as err:
        raise PreparedDatasetError(f"{where}: shard index is not valid JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise PreparedDatasetError(f"{where} is not a {INDEX_FORMAT} file")
    return index


def member_table(index: dict, members: tuple[str, ...], *, where: str) -> np.ndarray:
    """(N, 2 * len(members)) int64: [offset, size] of each wanted member of every sample."""
    try:
        rows = [[v for m in members for v in s["members"][m]] for s in index["samples"]]
    except (KeyError, TypeError) as err:
        raise PreparedDatasetError(f"{where}: sample without member {err}") from None
    return np.array(rows, dtype=np.int64).reshape(len(rows), 2 * len(members))


# --- sources ---------------------------------------------------------------------------------

class _ShardReader:
    """Indexed samples of one stream of a prepared dataset."""

    def __init__(self, uri: str, stream: str, *, index_cache: int = 256,
                 max_pixels: int = 64_000_000):
        self.uri, self.stream, self.members = uri, stream, STREAMS[stream]
        self.index_cache, self.max_pixels = int(index_cache), int(max_pixels)
        self._storage: Storage | None = open_storage(uri)
        section = read_manifest(self._storage)[stream]
        shards = [s for s in section["shards"] if s["count"] > 0]
        if not shards:
            raise PreparedDatasetError(f"the prepared dataset at {uri} holds no {stream} "
                                       "(see the skipped items in its manifest)")
        self._tars = [s["tar"] for s in shards]
        self._index_keys = [s["index"] for s in shards]
        self._ends = np.cumsum([s["count"] for s in shards])  # (S,) samples up to each shard
        self._tables: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.uri)
        return self._storage

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_storage"], state["_tables"] = None, collections.OrderedDict()
        return state

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        shard = int(np.searchsorted(self._ends, i, side="right"))
        return shard, i - (int(self._ends[shard - 1]) if shard else 0)

    def _index(self, shard: int) -> tuple[dict, np.ndarray]:
        key = self._index_keys[shard]
        where = self.storage.uri(key)
        index = parse_index(self.storage.get_bytes(key), where=where)
        table = member_table(index, self.members, where=where)
        count = int(self._ends[shard]) - (int(self._ends[shard - 1]) if shard else 0)
        if index.get("tar") != self._tars[shard] or len(table) != count:
            raise PreparedDatasetError(f"{self.storage.uri(key)} disagrees with the manifest "
                                       f"(tar {index.get('tar')}, {len(table)} samples)")
        return index, table

    def _table(self, shard: int) -> np.ndarray:
        if shard in self._tables:
            self._tables.move_to_end(shard)
        else:
            self._tables[shard] = self._index(shard)[1]
            while len(self._tables) > max(1, self.index_cache):
                self._tables.popitem(last=False)
        return self._tables[shard]

    def name(self, i: int) -> str:
        shard, j = self._locate(i)
        return self._index(shard)[0]["samples"][j]["key"]

    def _label(self, i: int) -> str:
        return f"{self.uri} {self.stream}[{i}]"  # cheap; name(i) would fetch the shard index

    def read(self, i: int) -> dict[str, bytes]:
        """The sample's members, fetched with one range read spanning them."""
        shard, j = self._locate(i)
        row = self._table(shard)[j].reshape(-1, 2)  # (members, [offset, size])
        start, stop = int(row[:, 0].min()), int((row[:, 0] + row[:, 1]).max())
        blob = read_range(self.storage, self._tars[shard], start, stop - start)
        return {m: blob[o - start:o - start + n] for m, (o, n) in zip(self.members, row.tolist())}


class ShardImages(_ShardReader, ImageSource):
    """The prepared images: `load(i)` -> (H, W, 3) uint8, BadImage if a sample is corrupt."""

    def __init__(self, uri: str, **kwargs):
        super().__init__(uri, "images", **kwargs)

    def load(self, i: int) -> np.ndarray:
        return load_rgb(self.read(i)["jpg"], max_pixels=self.max_pixels, name=self._label(i))


class ShardFrames(_ShardReader, FramesWithMasks):
    """The prepared frame/mask pairs: `load(i)` -> ((H, W, 3) uint8, (H, W) float32 in [0, 1])."""

    def __init__(self, uri: str, **kwargs):
        super().__init__(uri, "frames", **kwargs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        parts, label = self.read(i), self._label(i)
        rgb = load_rgb(parts["jpg"], max_pixels=self.max_pixels, name=label)
        mask = load_mask(parts["mask.png"], max_pixels=self.max_pixels, name=label)
        if mask.shape != rgb.shape[:2]:
            raise BadImage("mask_size", label, f"mask {mask.shape} vs frame {rgb.shape[:2]}")
        return rgb, mask
