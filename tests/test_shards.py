"""Prepared shards as training sources: byte-range reads, cheap pickling, corrupt samples
skipped by the task streams, the config naming a prepared dataset, and S3 (emulator) end to end."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image
from s3_emulator import s3_bucket, s3_emulator, s3_env  # noqa: F401
from test_prep import link_photos

from mtssl.config import DataConfig
from mtssl.data import shards as shards_mod
from mtssl.data.images import ArrayImages, BadImage, FolderImages
from mtssl.data.shards import PreparedDatasetError, ShardImages
from mtssl.data.sources import image_source
from mtssl.data.stream import TaskStream, loader
from mtssl.prep.dataset import prepare
from mtssl.prep.options import PrepConfig
from mtssl.storage import S3Storage


def corner(img, rng):
    """A minimal sampler: a random 24x24 crop, so batches depend on the image and the RNG."""
    y, x = rng.integers(img.shape[0] - 23), rng.integers(img.shape[1] - 23)
    return {"x": img[y:y + 24, x:x + 24].astype(np.float32)}


def stream_of(source, **kw):
    return TaskStream(source=source, sampler=corner, batch_size=4, seed=3, stream_id=0, **kw)


@pytest.fixture
def prepared(photo_pool, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    link_photos(photo_pool, src, 12)
    manifest = prepare(PrepConfig(input=str(src), output=str(out), short_side=48,
                                  shard_max_items=4, progress=False, workers=1))
    return out, manifest


def members(out, manifest):
    """{key: jpg bytes} straight from the tars, in manifest order."""
    found = {}
    for entry in manifest["images"]["shards"]:
        with tarfile.open(out / entry["tar"]) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    found[m.name[:-4]] = tar.extractfile(m).read()
    return found


def test_shard_images_read_each_sample_by_byte_range(prepared, monkeypatch):
    out, manifest = prepared
    expected = members(out, manifest)
    source = ShardImages(str(out), index_cache=1)
    assert len(source) == 12 and [source.name(i) for i in range(12)] == list(expected)
    reads = []
    real = shards_mod.read_range
    monkeypatch.setattr(shards_mod, "read_range",
                        lambda st, key, off, n: (reads.append((key, n)), real(st, key, off, n))[1])
    for i, (key, jpg) in enumerate(expected.items()):
        want = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
        assert np.array_equal(source.load(i), want)
        assert reads[-1] == (manifest["images"]["shards"][i // 4]["tar"], len(jpg))
    assert len(source._tables) == 1  # index_cache bounds the shard indexes held


def test_sources_pickle_as_uri_and_shard_table(prepared):
    out, _ = prepared
    source = ShardImages(str(out))
    before = len(pickle.dumps(source))
    first = source.load(7)
    after = pickle.dumps(source)
    assert len(after) == before < 2000  # caches and the storage client are not pickled
    clone = pickle.loads(after)
    assert clone._storage is None and np.array_equal(clone.load(7), first)


def test_a_corrupt_sample_is_skipped_by_the_task_stream(prepared):
    out, manifest = prepared
    source = ShardImages(str(out))
    shard = out / manifest["images"]["shards"][1]["tar"]
    index = json.loads((out / manifest["images"]["shards"][1]["index"]).read_text())
    off, size = index["samples"][2]["members"]["jpg"]  # sample 4 + 2 = 6
    raw = bytearray(shard.read_bytes())
    raw[off:off + size] = b"\x00" * size
    shard.write_bytes(bytes(raw))
    with pytest.raises(BadImage) as err:
        source.load(6)
    stream = stream_of(source, stop_batch=8)
    skipped = [s for batch in stream for s in batch["skipped"]]
    assert skipped == [(source.name(6), err.value.reason)]


def test_index_disagreeing_with_manifest_and_missing_dataset_are_clear_errors(prepared, tmp_path):
    out, manifest = prepared
    with pytest.raises(PreparedDatasetError, match="mtssl prep"):
        ShardImages(str(tmp_path / "nothing"))
    index_path = out / manifest["images"]["shards"][2]["index"]
    index = json.loads(index_path.read_text())
    index["samples"] = index["samples"][:-1]
    index_path.write_text(json.dumps(index))
    source = ShardImages(str(out))
    source.load(0)
    with pytest.raises(PreparedDatasetError, match="disagrees with the manifest"):
        source.load(9)


def test_data_images_may_name_a_prepared_dataset(prepared, tmp_path):
    out, _ = prepared
    assert isinstance(image_source(DataConfig(images=str(out))), ShardImages)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "plain.png")
    assert isinstance(image_source(DataConfig(images=str(tmp_path))), FolderImages)
    assert isinstance(image_source(DataConfig()), ArrayImages)


def test_s3_prep_resumes_and_workers_read_the_same_batches(photo_pool, tmp_path, s3_bucket,
                                                          monkeypatch):
    src = tmp_path / "in"
    link_photos(photo_pool, src, 10)
    opts = dict(input=str(src), short_side=48, shard_max_items=4, progress=False, workers=1)
    local = prepare(PrepConfig(output=str(tmp_path / "local"), **opts))
    uri = f"s3://{s3_bucket}/datasets/v1"
    real_put = S3Storage.put_file
    uploads = []

    def put_file(self, key, path):  # the first run dies while uploading shard 1
        uploads.append(key)
        if uploads == ["images/shard-000000.tar", "images/shard-000001.tar"]:
            raise KeyboardInterrupt
        real_put(self, key, path)

    monkeypatch.setattr(S3Storage, "put_file", put_file)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepConfig(output=uri, **opts))
    on_s3 = prepare(PrepConfig(output=uri, **opts))
    assert uploads[2:] == ["images/shard-000001.tar", "images/shard-000002.tar"]  # 0 verified
    assert on_s3 == local  # same shards (sha256), counts, prior and skips as a local prep
    source = image_source(DataConfig(images=uri))
    assert isinstance(source, ShardImages) and len(source) == 10
    local_source = ShardImages(str(tmp_path / "local"))
    assert all(np.array_equal(source.load(i), local_source.load(i)) for i in range(10))
    serial = [b["x"] for b in loader(stream_of(source, stop_batch=4), num_workers=0)]
    parallel = [b["x"] for b in loader(stream_of(source, stop_batch=4), num_workers=2)]
    assert len(parallel) == 4 and all(np.array_equal(a, b) for a, b in zip(serial, parallel))
