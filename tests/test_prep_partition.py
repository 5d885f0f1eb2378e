"""`mtssl prep --partition K/N` and `mtssl prep-merge`: N partitions merged hold exactly the items,
counts and skips of a one-run prep; missing, mixed or damaged partitions are
refused without touching a good manifest; the default uses every usable CPU."""

import json
import re

import pytest
from test_prep import files_digest, link_photos, options, tar_samples

from mtssl.cli import main
from mtssl.data.shards import ShardFrames, ShardImages
from mtssl.prep.dataset import prepare
from mtssl.prep.merge import merge
from mtssl.prep.options import PrepConfig, usable_cpus
from mtssl.prep.shards import PrepError


@pytest.fixture
def mixed(photo_pool, videos, davis, tmp_path):
    """Photos, one corrupt image, a text file, a video and a DAVIS frame folder (real or
    synthetic, see conftest.py)."""
    src = tmp_path / "in"
    link_photos(photo_pool, src, 11)
    (src / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "notes.txt").write_text("not an image")
    (src / "clips").mkdir()
    (src / "clips" / "clip.mp4").symlink_to(videos[0])
    sequence = next(iter(davis.lengths))
    (src / "clips" / sequence).symlink_to(davis.root / "JPEGImages" / "480p" / sequence)
    return src


def opts(src, out, **kw):
    return options(src, out, shard_max_items=3, frames_per_video=3, frame_short_side=64, **kw)


def samples(out, manifest):
    """{key: {ext: bytes}} over every shard of both streams."""
    found = {}
    for stream in ("images", "frames"):
        for entry in manifest[stream]["shards"]:
            found.update(tar_samples(out / entry["tar"]))
    return found


def test_merged_partitions_hold_what_one_prep_holds(mixed, tmp_path):
    one = prepare(opts(mixed, tmp_path / "one"))
    parts = tmp_path / "parts"
    for k in (1, 2, 3):
        part = prepare(opts(mixed, parts, partition=f"{k}/3"))
        assert part["partition"] == [k, 3]
        assert not (parts / "manifest.json").exists()  # no usable dataset before the merge
    merged = merge(str(parts))
    assert json.loads((parts / "manifest.json").read_text()) == merged
    assert samples(parts, merged) == samples(tmp_path / "one", one)
    assert merged["fingerprint"] == one["fingerprint"] and merged["config"] == one["config"]
    for stream, keys in (("images", ("count", "files", "grayscale")),
                         ("frames", ("count", "clips", "masks"))):
        assert {k: merged[stream][k] for k in keys} == {k: one[stream][k] for k in keys}
        # more, smaller tars than one prep writes: the same members, other tar overhead
        shards = merged[stream]["shards"]
        assert merged[stream]["bytes"] == sum(s["bytes"] for s in shards) == sum(
            (parts / s["tar"]).stat().st_size for s in shards)
    assert sorted(merged["skipped"]["items"]) == sorted(one["skipped"]["items"])
    assert merged["skipped"]["by_reason"] == one["skipped"]["by_reason"] == {"not_an_image": 1}
    assert merged["ignored_files"] == one["ignored_files"] == {".txt": 1}
    assert len({s["tar"] for s in merged["images"]["shards"]}) > 3  # every partition's shards
    for stream in ("images", "frames"):
        for s in merged[stream]["shards"]:
            assert s["tar"].startswith(f"{stream}/part-000")
    assert len(ShardImages(str(parts))) == one["images"]["count"] == 11
    assert len(ShardFrames(str(parts))) == one["frames"]["count"] > 0


def test_partition_reruns_resume_and_refusals(mixed, tmp_path, capsys):
    out = tmp_path / "parts"
    prepare(opts(mixed, out, partition="1/2"))
    with pytest.raises(PrepError, match=r"partition\(s\) 2 of 2 are not prepared"):
        merge(str(out))
    assert main(["prep-merge", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mtssl prep-merge: ") and err.count("\n") == 1
    prepare(opts(mixed, out, partition="2/2", workers=2))
    good = merge(str(out))
    first = files_digest(out)
    prepare(opts(mixed, out, partition="2/2"))  # a finished partition is reproduced as it is
    assert files_digest(out) == first
    # a damaged shard: the merge refuses and the good manifest stays
    tar = out / good["frames"]["shards"][0]["tar"]
    raw = bytearray(tar.read_bytes())
    raw[600] ^= 0xFF
    tar.write_bytes(bytes(raw))
    with pytest.raises(PrepError, match="does not match its manifest"):
        merge(str(out))
    assert json.loads((out / "manifest.json").read_text()) == good
    k, n = re.fullmatch(r"frames/part-(\d+)-of-(\d+)/shard-\d+\.tar",
                        tar.relative_to(out).as_posix()).groups()
    prepare(opts(mixed, out, partition=f"{int(k)}/{int(n)}"))  # its partition redoes the shard
    assert merge(str(out)) == good
    # one-run and partitioned preps are not mixed in one output
    with pytest.raises(PrepError, match="prepared in partitions"):
        prepare(opts(mixed, out))
    with pytest.raises(PrepError, match="partitionings"):
        prepare(opts(mixed, out, partition="1/3"))
        merge(str(out))
    with pytest.raises(PrepError, match="prepared in one run"):
        prepare(opts(mixed, tmp_path / "one"))
        prepare(opts(mixed, tmp_path / "one", partition="1/2"))
    # overwriting a partition takes the merged manifest with it (it names that partition's shards)
    prepare(opts(mixed, out, partition="2/2"), overwrite=True)
    assert not (out / "manifest.json").exists()
    assert main(["prep", str(mixed), str(out), "--partition", "3/2"]) == 2
    assert "prep.partition" in capsys.readouterr().err
    assert main(["prep-merge", str(tmp_path / "nothing")]) == 1
    assert "no partitions under" in capsys.readouterr().err


def test_default_workers_are_the_usable_cpus(tmp_path):
    cfg = PrepConfig(input="in", output="out")
    assert cfg.workers is None and cfg.processes == usable_cpus() >= 1
    assert PrepConfig(input="in", output="out", workers=3).processes == 3
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a Kubernetes limit of 1.5 CPUs: two processes
    assert usable_cpus(str(quota)) == min(2, usable_cpus(str(tmp_path / "absent")))
    quota.write_text("max 100000\n")
    assert usable_cpus(str(quota)) == usable_cpus(str(tmp_path / "absent"))
