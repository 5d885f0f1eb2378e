"""`mtssl prep` on images: photos (synthetic, and real Caltech ones) into shards, exact re-runs,
resume after an interruption, checksum-verified shards, every kind of bad input skipped and
listed, the CLI."""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mtssl.cli import main
from mtssl.config import ConfigError, build
from mtssl.prep import shards as prep_shards
from mtssl.prep.dataset import prepare
from mtssl.prep.options import PrepConfig
from mtssl.prep.shards import PrepError
from mtssl.storage import LocalStorage


def link_photos(photo_pool, dest, n, *, folders=("a", "a/b", "c/d/e")):
    """The first n photos of the pool symlinked into a nested tree under dest."""
    pool = photo_pool[:n]
    for i, src in enumerate(pool):
        folder = dest / folders[i % len(folders)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / src.name).symlink_to(src)
    return pool


def options(src, out, **kw):
    kw = {"short_side": 64, "shard_max_items": 5, "progress": False, "workers": 1, **kw}
    return PrepConfig(input=str(src), output=str(out), **kw)


def files_digest(root):
    """{relative path: sha256} of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tar_samples(path):
    """{key: {ext: bytes}} by WebDataset's rule (key ends at the first '.' of the file name)."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            folder, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            out.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext] = \
                tar.extractfile(m).read()
    return out


@pytest.fixture
def photos(photo_pool, tmp_path):
    src = tmp_path / "in"
    return src, link_photos(photo_pool, src, 23)


def test_images_become_resized_shards_with_index_and_manifest(photos, tmp_path):
    src, pool = photos
    out = tmp_path / "out"
    manifest = prepare(options(src, out))
    assert manifest["images"]["count"] == 23 and manifest["skipped"]["count"] == 0
    assert [s["count"] for s in manifest["images"]["shards"]] == [5, 5, 5, 5, 3]
    by_name = {p.name: p for p in pool}
    seen = set()
    for entry in manifest["images"]["shards"]:
        raw = (out / entry["tar"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == entry["sha256"] and len(raw) == entry["bytes"]
        samples = tar_samples(out / entry["tar"])
        index = json.loads((out / entry["index"]).read_text())
        assert [s["key"] for s in index["samples"]] == list(samples)
        for s in index["samples"]:
            for ext, (offset, size) in s["members"].items():
                assert raw[offset:offset + size] == samples[s["key"]][ext]
        for key, members in samples.items():
            assert set(members) == {"jpg", "json"} and "." not in key.rsplit("/", 1)[-1]
            meta = json.loads(members["json"])
            source = by_name[meta["source"].rsplit("/", 1)[-1]]
            assert meta["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
            w, h = Image.open(source).size
            got = Image.open(io.BytesIO(members["jpg"]))
            assert got.format == "JPEG" and got.mode == "RGB"
            assert min(got.size) == min(64, w, h)  # shrunk to the short side, never enlarged
            assert abs(got.size[0] / got.size[1] - w / h) < 0.03
            seen.add(meta["source"])
    assert len(seen) == 23


def test_manifest_has_no_colour_prior_and_old_ones_still_read(photos, tmp_path):
    """The colour prior prep once wrote was never read (colorization measures its own): no
    longer written, and a dataset whose manifest still has one reads and resumes as before."""
    from mtssl.data.shards import MANIFEST, read_manifest
    from mtssl.storage import open_storage
    src, _ = photos
    out = tmp_path / "out"
    manifest = prepare(options(src, out))
    assert "colour_prior" not in manifest
    old = dict(manifest, colour_prior={"bins": 313, "counts": [0] * 313, "prior": [0.0] * 313})
    (out / MANIFEST).write_text(json.dumps(old))
    assert read_manifest(open_storage(str(out)), MANIFEST)["colour_prior"]["bins"] == 313
    again = prepare(options(src, out))  # same fingerprint: verified, not redone or refused
    assert again["images"] == manifest["images"]


@pytest.mark.parametrize("workers", [1, 2])
def test_rerun_is_identical_and_interrupted_prep_resumes(photos, tmp_path, monkeypatch, workers):
    src, _ = photos
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    prepare(options(src, clean))
    reference = files_digest(clean)

    # killed between the upload of shard 2's tar and its index
    real_put_bytes = LocalStorage.put_bytes

    def dies_at_index_2(self, key, data):
        if key == "images/shard-000002.json":
            raise KeyboardInterrupt
        real_put_bytes(self, key, data)

    monkeypatch.setattr(LocalStorage, "put_bytes", dies_at_index_2)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with pytest.raises(KeyboardInterrupt):
        prepare(options(src, resumed, tmp_dir=str(tmp), workers=workers))
    monkeypatch.undo()
    assert not (resumed / "manifest.json").exists() and list(tmp.iterdir()) == []
    assert (resumed / "images/shard-000002.tar").exists()  # orphan tar, no index

    uploads = []
    real_put_file = LocalStorage.put_file
    monkeypatch.setattr(LocalStorage, "put_file", lambda self, key, path: (
        uploads.append(key), real_put_file(self, key, path)))
    prepare(options(src, resumed, workers=workers))
    assert uploads == [f"images/shard-00000{i}.tar" for i in (2, 3, 4)]  # 0 and 1 were kept
    assert files_digest(resumed) == reference

    uploads.clear()
    prepare(options(src, resumed))  # finished: nothing rewritten, same manifest
    assert uploads == [] and files_digest(resumed) == reference


def test_worker_processes_give_the_same_dataset(photos, tmp_path):
    src, _ = photos
    prepare(options(src, tmp_path / "serial"))
    prepare(options(src, tmp_path / "parallel", workers=2))
    assert files_digest(tmp_path / "parallel") == files_digest(tmp_path / "serial")


def test_an_output_inside_the_input_is_not_read_as_input(photos):
    src, _ = photos
    first = prepare(options(src, src / "prepared"))
    again = prepare(options(src, src / "prepared"))
    assert first == again and first["images"]["count"] == 23 and first["ignored_files"] == {}


def test_corrupt_shard_is_detected_and_redone(photos, tmp_path, caplog):
    src, _ = photos
    out = tmp_path / "out"
    prepare(options(src, out))
    reference = files_digest(out)
    shard = out / "images/shard-000003.tar"
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    prepare(options(src, out))
    assert "shard-000003.tar: checksum mismatch" in caplog.text
    assert files_digest(out) == reference


def test_changed_input_or_options_are_refused_unless_overwrite(photos, photo_pool, tmp_path):
    src, pool = photos
    out = tmp_path / "out"
    prepare(options(src, out))
    with pytest.raises(PrepError, match="other options"):
        prepare(options(src, out, short_side=48))
    # a photo not yet in the input, sorting first: every shard's range moves
    (src / "a" / "0000_added.jpg").symlink_to(photo_pool[23])
    with pytest.raises(PrepError, match="differ from those"):
        prepare(options(src, out))
    manifest = prepare(options(src, out), overwrite=True)
    assert manifest["images"]["count"] == 24


def _bad_inputs(root, photo):
    """Every kind of awkward file, from one photo; returns {name: expected reason}."""
    rgb = Image.open(photo).convert("RGB")
    jpg = io.BytesIO()
    rgb.save(jpg, "JPEG", quality=95)
    bad = root / "bad"
    bad.mkdir(parents=True)
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (bad / "notes.jpg").write_text("this is text, not a JPEG\n")
    Image.new("1", (9000, 9000)).save(bad / "bomb.png")  # 81 Mpx > max_pixels, 10 kB on disk
    rgb.resize((20, 14)).save(bad / "tiny.png")
    (root / "locked").mkdir()
    rgb.save(root / "locked" / "hidden.jpg")
    (bad / "readme.txt").write_text("not an image")
    # awkward but valid: converted, kept
    rgb.convert("CMYK").save(bad / "cmyk.jpg", quality=95)
    gray16 = (np.asarray(rgb.convert("L"), np.uint16) * 257)
    Image.fromarray(gray16).save(bad / "gray16.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(bad / "palette.png")
    return {"bad/empty.jpg": "empty_file", "bad/truncated.jpg": "truncated",
            "bad/notes.jpg": "not_an_image", "bad/bomb.png": "decompression_bomb",
            "bad/tiny.png": "too_small", "locked": "permission_denied"}


def test_bad_inputs_are_skipped_with_reasons_and_awkward_ones_converted(photo_pool, tmp_path,
                                                                        monkeypatch):
    photo = photo_pool[5]
    src, out = tmp_path / "in", tmp_path / "out"
    expected = _bad_inputs(src, photo)
    real_scandir = os.scandir

    def scandir(path="."):  # simulated: tests run as root, where chmod 000 does not lock
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    manifest = prepare(options(src, out, short_side=128))
    monkeypatch.undo()
    skipped = {name: reason for name, reason, _ in manifest["skipped"]["items"]}
    assert skipped == expected
    assert manifest["skipped"]["by_reason"] == {r: 1 for r in expected.values()}
    assert manifest["ignored_files"] == {".txt": 1}
    assert manifest["images"]["count"] == 3 and manifest["images"]["grayscale"] == 1
    samples = tar_samples(out / manifest["images"]["shards"][0]["tar"])
    got = {json.loads(m["json"])["source"]: np.asarray(Image.open(io.BytesIO(m["jpg"])), float)
           for m in samples.values()}
    reference = Image.open(photo).convert("RGB")
    reference = reference.resize(Image.open(io.BytesIO(next(iter(samples.values()))["jpg"])).size)
    ref = np.asarray(reference, float)
    gray = np.asarray(reference.convert("L"), float)
    assert np.abs(got["bad/cmyk.jpg"] - ref).mean() < 6
    assert np.abs(got["bad/palette.png"] - ref).mean() < 10
    assert np.abs(got["bad/gray16.png"] - gray[..., None]).mean() < 4


def test_cli_runs_prep_and_rejects_bad_options(photos, tmp_path, capsys):
    src, _ = photos
    out = tmp_path / "out"
    assert main(["prep", str(src), str(out), "--short-side", "48", "--shard-max-items", "100",
                 "--progress", "true"]) == 0
    captured = capsys.readouterr()
    assert "images: kept 23 of 23 files in 1 shard(s)" in captured.out
    assert "file/s" in captured.err  # the progress bar's rate
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["short_side"] == 48 and manifest["config"]["input"] == str(src)
    assert main(["prep", str(src), str(out), "--short-side", "abc"]) == 2
    assert "prep.short_side" in capsys.readouterr().err
    assert main(["prep", str(src), str(out), "--jpeg-quality", "0"]) == 2
    assert "prep.jpeg_quality" in capsys.readouterr().err
    assert main(["prep", str(src), str(out), "--short-side", "64"]) == 1  # other options
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "prep.yaml").write_text("short_side: 48\nbogus: 1\n")
    assert main(["prep", str(src), str(out), "--config", str(tmp_path / "prep.yaml")]) == 2
    assert "prep.bogus" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="prep.frame_pattern"):
        build(PrepConfig, {"input": "a", "output": "b", "frame_pattern": "(["}, "prep")


def test_shard_writer_is_deterministic_and_indexes_long_keys(tmp_path):
    """Same samples -> byte-identical tars; keys over tar's 100-char name field still index."""
    payload = {"jpg": os.urandom(3000), "json": b"{}"}
    long_key = "deep/" + "x" * 150 + "-0123abcd"
    entries = []
    for run in ("a", "b"):
        w = prep_shards.ShardWriter(storage=LocalStorage(tmp_path / run), stream="images",
                                    number=0, first=0, fingerprint="f", tmp_dir=tmp_path)
        w.add("one.jpg", 10, prep_shards.ItemResult(
            samples=[prep_shards.Sample(long_key, payload), prep_shards.Sample("k2", payload)]))
        entries.append(w.finish(1))
    assert entries[0]["sha256"] == entries[1]["sha256"] and entries[0]["count"] == 2
    samples = tar_samples(tmp_path / "a" / entries[0]["tar"])
    assert samples[long_key] == payload
    index = json.loads((tmp_path / "a" / entries[0]["index"]).read_text())
    raw = (tmp_path / "a" / entries[0]["tar"]).read_bytes()
    off, size = index["samples"][0]["members"]["jpg"]
    assert index["samples"][0]["key"] == long_key and raw[off:off + size] == payload["jpg"]
