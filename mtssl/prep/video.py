"""Videos and frame folders -> frame + motion-mask samples for motion segmentation.

Frames t are sampled evenly over the clip; each mask comes from the motion module on frame t
and its neighbours t -/+ frame_gap, at the stored resolution, and the frame filter (Pathak et
al.) decides whether the pair is kept. Decoding streams through the clip and holds only the
frames still needed, so memory does not grow with the clip's length.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from mtssl.data.images import BadImage, load_rgb
from mtssl.prep.options import PrepConfig
from mtssl.prep.samples import encode_jpeg, encode_mask, meta_json, read_bytes, resize_short, sample_key
from mtssl.prep.shards import ItemResult, Sample
from mtssl.prep.walk import Item


class BadVideo(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def sample_frames(n: int, *, count: int, gap: int) -> list[int]:
    """Up to `count` frame indices evenly spread over [gap, n - 1 - gap]."""
    if n < 2 * gap + 1:
        return []
    return sorted({int(round(t)) for t in np.linspace(gap, n - 1 - gap, min(count, n - 2 * gap))})


def motion_pair(frame: np.ndarray, before: np.ndarray, after: np.ndarray,
                cfg: PrepConfig) -> tuple[np.ndarray, str | None]:
    """(mask (H, W) bool, reason the frame filter drops it or None) for frame t."""
    from mtssl.prep.motion import frame_filter, motion_mask
    gap = cfg.frame_gap
    # frames t-gap .. t+gap in their true positions (the motion module measures speed per
    # frame); only the three it reads are decoded, the others stay None
    clip = [before] + [None] * (gap - 1) + [frame] + [None] * (gap - 1) + [after]
    mask = motion_mask(clip, gap, offsets=(-gap, gap), method=cfg.flow)
    return mask, frame_filter(mask)


@contextlib.contextmanager
def _video(item: Item):
    """(frame count from the container, iterator of (index, av.VideoFrame)); closes the file."""
    import av

    if item.size == 0:
        raise BadVideo("empty_file", "zero-byte file")
    try:
        container = av.open(str(item.path))
    except av.error.FFmpegError as err:
        raise BadVideo("unreadable_video", f"cannot open container: {err}") from err
    with container:
        if not container.streams.video:
            raise BadVideo("no_video_stream", "the file holds no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise BadVideo("unsupported_codec", "FFmpeg has no decoder for the video's codec")
        n = stream.frames
        if n <= 0:  # not in the header: count packets (cheap, nothing decoded)
            with av.open(str(item.path)) as probe:
                n = sum(1 for p in probe.demux(probe.streams.video[0]) if p.size)
        stream.thread_type = "AUTO"
        yield n, enumerate(container.decode(stream))


def _folder_frames(item: Item, skipped: list) -> Iterator[tuple[int, np.ndarray | None]]:
    for i, name in enumerate(item.frames):
        rel = f"{item.rel}/{name}" if item.rel != "." else name
        try:
            yield i, load_rgb(read_bytes(Item("image", rel, item.path / name, 0)))
        except BadImage as err:
            skipped.append((rel, err.reason, err.detail))
            yield i, None


def prepare_clip(item: Item, cfg: PrepConfig) -> ItemResult:
    """A video file or frame folder -> frame/mask samples; frame-filter drops are counted."""
    import av

    result = ItemResult()
    opened = (_video(item) if item.kind == "video"
              else contextlib.nullcontext((len(item.frames), _folder_frames(item, result.skipped))))
    try:
        with opened as (n, frames):
            if n == 0:
                raise BadVideo("no_frames", "the video stream holds no frames")
            targets = sample_frames(n, count=cfg.frames_per_video, gap=cfg.frame_gap)
            if not targets:
                raise BadVideo("too_few_frames", f"{n} frame(s); motion needs at least "
                                                 f"{2 * cfg.frame_gap + 1} (2 * frame_gap + 1)")
            decoded = _pairs(item, frames, n, targets, cfg, result)
    except BadVideo as err:
        result.skipped.append((item.rel, err.reason, err.detail))
    except av.error.DecoderNotFoundError as err:
        result.skipped.append((item.rel, "unsupported_codec", str(err)))
    else:
        if decoded == 0 and not any(name == item.rel for name, _, _ in result.skipped):
            result.skipped.append((item.rel, "no_frames", "no frame could be decoded"))
    return result


def _pairs(item: Item, frames, n: int, targets: list[int], cfg: PrepConfig,
           result: ItemResult) -> int:
    """Streams `frames`, holding only those still needed; returns how many were decoded."""
    import av

    gap, wanted = cfg.frame_gap, {t + d for t in targets for d in (-cfg.frame_gap, 0,
                                                                    cfg.frame_gap)}
    held: dict[int, np.ndarray | None] = {}
    pending, decoded = list(targets), 0
    try:
        for i, frame in frames:
            decoded += 1
            if i in wanted:
                if frame is not None and not isinstance(frame, np.ndarray):
                    frame = frame.to_ndarray(format="rgb24")  # only frames we use are converted
                held[i] = None if frame is None else resize_short(frame, cfg.frame_short_side)
            while pending and pending[0] + gap in held:
                t = pending.pop(0)
                _emit(item, t, held.get(t - gap), held.get(t), held.get(t + gap), cfg, result)
                low = pending[0] - gap if pending else i + 1
                for k in [k for k in held if k < low]:
                    del held[k]
            if not pending:
                break
    except av.error.DecoderNotFoundError:
        raise
    except av.error.FFmpegError as err:  # a damaged stream: keep the pairs made before it
        result.skipped.append((item.rel, "decode_error", f"after {decoded} frames: {err}"))
    else:
        if pending:
            result.skipped.append((item.rel, "truncated", f"the stream ended after {decoded} "
                                                          f"of {n} announced frames"))
    if pending:
        result.masks["dropped:missing_frame"] += len(pending)
    return decoded


def _emit(item: Item, t: int, before, frame, after, cfg: PrepConfig, result: ItemResult) -> None:
    if before is None or frame is None or after is None:
        result.masks["dropped:missing_frame"] += 1
        return
    if not before.shape == frame.shape == after.shape:
        result.masks["dropped:size_change"] += 1
        return
    mask, drop = motion_pair(frame, before, after, cfg)
    if drop is not None:
        result.masks[f"dropped:{drop}"] += 1
        return
    result.masks["kept"] += 1
    meta = {"source": item.rel, "frame": t, "neighbours": [t - cfg.frame_gap, t + cfg.frame_gap],
            "moving": round(float(mask.mean()), 6), "size": [frame.shape[1], frame.shape[0]]}
    result.samples.append(Sample(f"{sample_key(item.rel)}/{t:06d}", {
        "jpg": encode_jpeg(frame, cfg.jpeg_quality), "mask.png": encode_mask(mask),
        "json": meta_json(meta)}))
