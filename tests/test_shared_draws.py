"""data.shared_draws: the image tasks pick the same item in each slot of a step, keep their own
augmentations and skips, stay a pure function of (seed, task, batch, slot, attempt) wherever
they are drawn, and a single process decodes each item of a step once."""

import copy

import numpy as np
import pytest
import torch
from conftest import TINY

from mtssl.config import load_config
from mtssl.data.images import ArrayImages
from mtssl.data.sources import JointBatches, TaskBatches, TaskData
from mtssl.data.stream import JointStream, NoUsableData, SkipSample, TaskStream
from mtssl.resume import check_resumable
from mtssl.tasks import TASKS

IMAGE_TASKS = ["relative_position", "colorization", "exemplar"]


class Counted:
    """A source counting its decodes (load calls)."""

    def __init__(self, source):
        self.source, self.loads = source, 0

    def __len__(self):
        return len(self.source)

    def name(self, i):
        return self.source.name(i)

    def load(self, i):
        self.loads += 1
        return self.source.load(i)


def noise_photos(n=24, size=72):
    """Distinct colour photos, identified by their first pixels (`photo_id`)."""
    rng = np.random.default_rng(5)
    return ArrayImages([(f"p{i}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                        for i in range(n)])


def photo_id(source: ArrayImages):
    ids = {source.load(i)[:2, :2].tobytes(): i for i in range(len(source))}
    return lambda img: ids[img[:2, :2].tobytes()]


class Recorded:
    """Wraps a sampler: logs (photo index, the sample's first augmentation draw)."""

    def __init__(self, sampler, ident, log):
        self.sampler, self.ident, self.log = sampler, ident, log

    def __call__(self, img, rng):
        self.log.append((self.ident(img), copy.deepcopy(rng).random()))
        return self.sampler(img, rng)


def tiny_data(*sets, source=None):
    cfg = load_config("quickstart", [*TINY, "data.image_cache=0", *sets])
    data = TaskData(cfg)
    data.sources["images"] = Counted(source or noise_photos())
    return data


def recorded_step(data, tasks, b):
    """Step b of `tasks` drawn together; per task, the (photo, augmentation) of each sample."""
    logs = {t: [] for t in tasks}
    streams = {t: data.stream(t) for t in tasks}
    ident = photo_id(data.sources["images"].source)
    for t, s in streams.items():
        s.sampler = Recorded(s.sampler, ident, logs[t])
    if data.cfg.data.shared_draws:
        JointStream(streams).batch(b)
    else:
        for s in streams.values():
            s.batch(b)
    return logs


def test_shared_draws_give_every_image_task_the_same_photo_in_each_slot():
    # Batch sizes 4, 4 and 8: the exemplar's larger batch draws slots 4-7 of its own.
    data = tiny_data("data.shared_draws=true", "tasks.exemplar.batch_size=8")
    for b in (0, 3):
        logs = recorded_step(data, IMAGE_TASKS, b)
        photos = {t: [p for p, _ in log] for t, log in logs.items()}
        assert photos["relative_position"] == photos["colorization"] == photos["exemplar"][:4]
        assert len(photos["exemplar"]) == 8
        # each task augments with its own RNG: the same photo, different draws
        draws = [log[0][1] for log in logs.values()]
        assert len(set(draws)) == 3
    # off: each task picks its own photos
    off = recorded_step(tiny_data("data.shared_draws=false", "tasks.exemplar.batch_size=8"),
                        IMAGE_TASKS, 0)
    assert [p for p, _ in off["relative_position"]] != [p for p, _ in off["colorization"]]


def test_two_tasks_with_one_sampler_share_photos_but_not_augmentations():
    sampler = TASKS["exemplar"].build_sampler(TASKS["exemplar"].config_cls(
        image_size=48, patch_size=16), None, False)
    photos = noise_photos()
    a, b = (TaskStream(source=photos, sampler=sampler, batch_size=4, seed=0, stream_id=sid,
                       pick_id=3000) for sid in (1, 2))
    alone = TaskStream(source=photos, sampler=sampler, batch_size=4, seed=0, stream_id=1)
    views = {k: s.batch(2)["views"] for k, s in (("a", a), ("b", b), ("alone", alone))}
    assert not torch.equal(views["a"], views["b"])
    assert not torch.equal(views["a"], views["alone"])  # the shared pick changed the photos
    assert torch.equal(views["a"], a.batch(2)["views"])  # and is still a pure function


class Echo:
    """A sampler that returns the item and one draw; `skip`: items it cannot use."""

    def __init__(self, skip=()):
        self.skip = set(skip)

    def __call__(self, item, rng):
        if int(item) in self.skip:
            raise SkipSample("unwanted")
        return {"item": np.asarray(item), "u": np.asarray(rng.random())}


class Numbers:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def name(self, i):
        return f"n{i}"

    def load(self, i):
        return np.int64(i)


def echo_stream(sampler, stream_id, **kw):
    return TaskStream(source=kw.pop("source", Numbers(10)), sampler=sampler, batch_size=6,
                      seed=1, stream_id=stream_id, pick_id=3000, **kw)


def test_a_skip_moves_only_that_task_to_its_next_attempt():
    numbers = Numbers(10)
    picky = echo_stream(Echo(skip={0, 1, 2, 3, 4}), 1, source=numbers)
    other = echo_stream(Echo(), 2, source=numbers)
    with_picky = JointStream({"picky": picky, "other": other}).batch(4)
    plain = JointStream({"plain": echo_stream(Echo(), 1, source=numbers),
                         "other": echo_stream(Echo(), 2, source=numbers)}).batch(4)
    # the other task's samples do not depend on the picky task's skips ...
    assert torch.equal(with_picky["other"]["item"], plain["other"]["item"])
    assert torch.equal(with_picky["other"]["u"], plain["other"]["u"])
    assert with_picky["other"]["skipped"] == []
    # ... the picky one redrew exactly the slots it skipped, and no slot it kept moved
    kept = with_picky["picky"]["item"]
    assert all(int(i) > 4 for i in kept) and with_picky["picky"]["skipped"]
    unskipped = plain["plain"]["item"] > 4
    assert torch.equal(kept[unskipped], plain["plain"]["item"][unskipped])
    assert torch.equal(kept, echo_stream(Echo(skip={0, 1, 2, 3, 4}), 1).batch(4)["item"])


def test_shared_picks_respect_the_holdout_split():
    numbers = Numbers(30)
    train = echo_stream(Echo(), 1, source=numbers, holdout=(3, "train"))
    held = echo_stream(Echo(), 2, source=numbers, holdout=(3, "holdout"))
    drawn = torch.cat([train.batch(b)["item"] for b in range(8)])
    assert all(int(i) % 3 != 2 for i in drawn)
    assert all(int(i) % 3 == 2 for i in held.batch(0)["item"])


def test_a_step_decodes_each_photo_once_in_process():
    on = tiny_data("data.shared_draws=true")
    logs = recorded_step(on, IMAGE_TASKS, 1)
    picked = [p for log in logs.values() for p, _ in log]
    assert on.sources["images"].loads == len(set(picked)) < len(picked)
    off = tiny_data("data.shared_draws=false")
    logs = recorded_step(off, IMAGE_TASKS, 1)
    assert off.sources["images"].loads == sum(len(log) for log in logs.values())


def test_a_corrupt_photo_is_read_once_per_step_and_skipped_by_every_task_that_picks_it():
    class Broken(Counted):
        def load(self, i):
            from mtssl.data.images import BadImage
            self.loads += 1
            raise BadImage("corrupt", self.name(i), "test")

    data = TaskData(load_config("quickstart", [*TINY, "data.shared_draws=true"]))
    data.sources["images"] = Broken(noise_photos())
    step = {}
    streams = {t: data.stream(t) for t in IMAGE_TASKS}
    with pytest.raises(NoUsableData):
        streams["exemplar"].batch(0, step)
    loads = data.sources["images"].loads
    skipped = []
    with pytest.raises(NoUsableData):
        streams["colorization"].sample(0, skipped, step)
    assert data.sources["images"].loads == loads  # its first attempts' photos: read already
    assert skipped and all(why == "corrupt" for _, why in skipped)


def batches_of(feed, tasks, steps):
    return {t: [feed[t].batch(t, b) for b in steps] for t in tasks}


def same(a, b):
    """The same samples (the skipped items are reported once per stream: history, not data)."""
    assert a.keys() == b.keys()
    for k in a.keys() - {"skipped"}:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("workers", [0, 1])
def test_joint_loader_matches_the_tasks_own_streams_and_distributed_shards(workers):
    """In-process or in DataLoader workers (data.num_workers per task), resumed at a later step,
    the joint loader gives each task the batches its own stream gives, and so do two
    distributed workers' shards together."""
    sets = ("data.shared_draws=true", f"data.num_workers={workers}", "tasks.exemplar.batch_size=8")
    data = TaskData(load_config("quickstart", [*TINY, *sets]))
    feeds = data.feeds(IMAGE_TASKS, pin_memory=False)
    assert all(isinstance(f, JointBatches) for f in feeds.values())
    joint = batches_of(feeds, IMAGE_TASKS, [0, 1, 2, 5, 6])  # 5: the position moved (resume)
    for t in IMAGE_TASKS:
        own = [data.stream(t).batch(b) for b in [0, 1, 2, 5, 6]]
        halves = [TaskBatches(data, shard=(k, 2)) for k in range(2)]
        for b, got, want in zip([0, 1, 2, 5, 6], joint[t], own):
            same(got, want)
            parts = [h.batch(t, b) for h in halves]
            key = TASKS[t].input_key
            assert torch.equal(torch.cat([p[key] for p in parts]), want[key]), (t, b)


def test_calibration_and_health_streams_keep_their_own_picks():
    off, on = (TaskData(load_config("quickstart", [*TINY, "data.holdout_every=2",
                                                   f"data.shared_draws={flag}"]))
               for flag in ("false", "true"))
    for offset, split in ((1000, "train"), (2000, "holdout")):
        a, b = (d.stream("colorization", stream_offset=offset, split=split).batch(0) for d in (off, on))
        assert torch.equal(a["ab"], b["ab"])
    assert not torch.equal(off.stream("colorization").batch(0)["ab"],
                           on.stream("colorization").batch(0)["ab"])


def test_resuming_with_the_switch_flipped_says_the_samples_change(caplog):
    saved = load_config("quickstart", [*TINY, "data.shared_draws=false"])
    check_resumable(saved, load_config("quickstart", [*TINY, "data.shared_draws=false",
                                                      "data.num_workers=2"]))
    assert "data settings" not in caplog.text  # a loader setting decides no sample
    check_resumable(saved, load_config("quickstart", [*TINY, "data.shared_draws=true"]))
    assert "changed data settings data.shared_draws" in caplog.text


def test_the_benchmark_prints_its_ratios(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from PIL import Image
    photos = noise_photos(6)
    for i in range(len(photos)):
        Image.fromarray(photos.load(i)).save(tmp_path / f"{i}.png")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shared_decode.py"
    spec = importlib.util.spec_from_file_location("shared_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main([*(a for o in TINY for a in ("-o", o)), "--images", str(tmp_path),
                        "--steps", "2"])
    assert table[0][:3] == ["images", "decodes/step off / on", "ratio"]
    off, on = (float(v) for v in table[1][1].split(" / "))
    assert on < off and float(table[1][2]) == pytest.approx(on / off, abs=0.01)
    assert "samples/s/core" in capsys.readouterr().out
