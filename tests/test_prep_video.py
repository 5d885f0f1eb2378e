"""`mtssl prep` on videos and frame folders: mp4s and DAVIS frame folders (synthetic, and real)
become frame + motion-mask shards filtered like Pathak et al.; broken videos are skipped with
their reasons."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from synthetic import write_video
from test_prep import files_digest, tar_samples

from mtssl.data.shards import ShardFrames
from mtssl.prep.dataset import prepare
from mtssl.prep.options import PrepConfig
from mtssl.prep.samples import resize_short
from mtssl.prep.video import sample_frames


def frame_filter_holds(mask: np.ndarray) -> bool:
    """Pathak et al.'s rule: 10-80% of pixels move, at most 10% of the 5% border band moves."""
    h, w = mask.shape
    bh, bw = int(np.ceil(0.05 * h)), int(np.ceil(0.05 * w))
    band = np.ones_like(mask, bool)
    band[bh:h - bh, bw:w - bw] = False
    return 0.1 <= mask.mean() <= 0.8 and mask[band].mean() <= 0.1


def decoded_frames(path, wanted):
    import av
    with av.open(str(path)) as c:
        return {i: f.to_ndarray(format="rgb24") for i, f in enumerate(c.decode(video=0))
                if i in wanted}


def test_sample_frames_spreads_targets_inside_the_clip():
    assert sample_frames(100, count=4, gap=2) == [2, 34, 65, 97]
    assert sample_frames(5, count=8, gap=2) == [2]
    assert sample_frames(4, count=8, gap=2) == []


@pytest.fixture
def clips(videos, davis, tmp_path):
    src = tmp_path / "in"
    (src / "videos").mkdir(parents=True)
    for video in videos:
        (src / "videos" / video.name).symlink_to(video)
    (src / "davis").mkdir()
    for seq in list(davis.lengths)[:2]:
        (src / "davis" / seq).symlink_to(davis.root / "JPEGImages/480p" / seq)
    return src


def test_videos_and_frame_folders_become_filtered_frame_mask_pairs(clips, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(PrepConfig(input=str(clips), output=str(out), frames_per_video=4,
                                  frame_short_side=96, progress=False, workers=1))
    frames = manifest["frames"]
    assert manifest["images"]["count"] == 0 and manifest["skipped"]["count"] == 0
    assert frames["clips"] == 4  # 2 videos + 2 frame folders; DAVIS frames are not images
    masks = frames["masks"]
    assert masks["kept"] == frames["count"] > 0
    assert masks["kept"] + sum(masks["dropped"].values()) == 16  # 4 sampled per clip
    assert set(masks["dropped"]) <= {"too_little_motion", "too_much_motion", "border_motion"}
    for entry in frames["shards"]:
        for key, m in tar_samples(out / entry["tar"]).items():
            assert set(m) == {"jpg", "mask.png", "json"}
            meta = json.loads(m["json"])
            frame = np.asarray(Image.open(io.BytesIO(m["jpg"])))
            mask_img = Image.open(io.BytesIO(m["mask.png"]))
            mask = np.asarray(mask_img)
            assert mask_img.mode == "L" and set(np.unique(mask)) <= {0, 255}
            assert mask.shape == frame.shape[:2] and min(mask.shape) == 96
            assert frame_filter_holds(mask > 0)  # only frames passing the filter are stored
            assert meta["moving"] == pytest.approx((mask > 0).mean(), abs=1e-6)
            assert key == f"{key.split('/')[0]}/{key.split('/')[1]}/{meta['frame']:06d}"
    source = ShardFrames(str(out))
    rgb, mask = source.load(len(source) - 1)
    assert rgb.dtype == np.uint8 and mask.dtype == np.float32 and set(np.unique(mask)) <= {0, 1}


def test_each_stored_frame_is_frame_t_of_its_video(clips, tmp_path, monkeypatch):
    """Where frames land, not mask quality: a keep-all stand-in replaces the motion module
    and stores a mask that encodes t, so frame, mask and metadata must all agree."""
    import av

    import mtssl.prep.video as video

    def keep_all_stand_in(frame, before, after, cfg):
        return np.arange(frame.shape[0] * frame.shape[1]).reshape(frame.shape[:2]) % 3 == 0, None

    monkeypatch.setattr(video, "motion_pair", keep_all_stand_in)
    out = tmp_path / "out"
    manifest = prepare(PrepConfig(input=str(clips), output=str(out), frames_per_video=3,
                                  frame_short_side=72, exclude=("davis",), progress=False, workers=1))
    assert manifest["frames"]["masks"] == {"kept": 6, "dropped": {}}
    stored = {}
    for entry in manifest["frames"]["shards"]:
        for m in tar_samples(out / entry["tar"]).values():
            meta = json.loads(m["json"])
            stored.setdefault(meta["source"], {})[meta["frame"]] = (
                np.asarray(Image.open(io.BytesIO(m["jpg"])), float),
                np.asarray(Image.open(io.BytesIO(m["mask.png"]))))
    assert len(stored) == 2
    for source, by_t in stored.items():
        with av.open(str(clips / source)) as c:
            n = c.streams.video[0].frames
        assert sorted(by_t) == sample_frames(n, count=3, gap=2)
        gap = 2
        raw = decoded_frames(clips / source, {t + d for t in by_t for d in (-gap, 0, gap)})
        for t, (frame, mask) in by_t.items():
            err = {i: np.abs(resize_short(raw[i], 72).astype(float) - frame).mean()
                   for i in (t - gap, t, t + gap)}
            assert min(err, key=err.get) == t and err[t] < 4  # JPEG error only
            assert np.array_equal(mask > 0, keep_all_stand_in(frame, None, None, None)[0])


def test_frame_shards_are_reproducible(davis, tmp_path):
    """Masks depend only on the frames: a second prep in the same process (OpenCV's RNG state
    advanced by the first) and one in two worker processes write byte-identical shards."""
    src = tmp_path / "in"
    src.mkdir()
    seq = next(iter(davis.lengths))
    (src / seq).symlink_to(davis.root / "JPEGImages/480p" / seq)
    runs = [prepare(PrepConfig(input=str(src), output=str(tmp_path / name), frames_per_video=6,
                               frame_short_side=96, progress=False, workers=workers))
            for name, workers in (("a", 1), ("b", 1), ("c", 2))]
    assert runs[0]["frames"]["count"] > 0
    assert files_digest(tmp_path / "a") == files_digest(tmp_path / "b") == \
        files_digest(tmp_path / "c")


def _audio_only(path):
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 8000
        for p in list(s.encode(frame)) + list(s.encode()):
            c.mux(p)


def test_broken_videos_and_frames_are_skipped_with_reasons(videos, davis, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    bad = src / "bad"
    bad.mkdir(parents=True)
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("not a video\n")
    whole = videos[1].read_bytes()
    (bad / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # its index (moov) is gone
    decoded = list(decoded_frames(videos[0], set(range(30))).values())
    write_video(bad / "one_frame.mp4", decoded[:1])
    write_video(bad / "no_frames.avi", [])
    write_video(bad / "fourcc.avi", decoded[:6])
    # index first (faststart), then cut in half: opens fine, announces 30 frames, decodes 1
    write_video(bad / "cut.mp4", decoded, movflags="faststart")
    whole = (bad / "cut.mp4").read_bytes()
    (bad / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    raw = (bad / "fourcc.avi").read_bytes()
    (bad / "unknown_codec.avi").write_bytes(raw.replace(b"FMP4", b"ZZZZ"))  # no such decoder
    (bad / "fourcc.avi").unlink()
    _audio_only(bad / "audio.mp4")
    seq = src / "seq"  # a frame folder with one frame replaced by text
    seq.mkdir()
    first = next(iter(davis.lengths))
    for p in sorted((davis.root / "JPEGImages/480p" / first).iterdir())[:9]:
        (seq / p.name).symlink_to(p)
    (seq / "00004.jpg").unlink()
    (seq / "00004.jpg").write_text("garbage")
    manifest = prepare(PrepConfig(input=str(src), output=str(out), frames_per_video=5,
                                  frame_short_side=64, progress=False, workers=1))
    skipped = {name: reason for name, reason, _ in manifest["skipped"]["items"]}
    assert skipped == {
        "bad/empty.mp4": "empty_file", "bad/text.mp4": "unreadable_video",
        "bad/truncated.mp4": "unreadable_video", "bad/one_frame.mp4": "too_few_frames",
        "bad/no_frames.avi": "no_frames", "bad/unknown_codec.avi": "unsupported_codec",
        "bad/audio.mp4": "no_video_stream", "bad/cut.mp4": "truncated",
        "seq/00004.jpg": "not_an_image"}
    masks = manifest["frames"]["masks"]
    # seq: targets 2..6 of 9 frames, those needing frame 4 (t = 2, 4, 6) cannot be made;
    # cut.mp4: all 5 targets lie past the frame it decodes
    assert masks["dropped"]["missing_frame"] == 3 + 5
    assert masks["kept"] + sum(masks["dropped"].values()) == 10
