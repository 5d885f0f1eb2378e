"""The trainer on a prepared dataset: photos and DAVIS frames (synthetic, and real) prepped into
shards (on disk and on the S3 emulator), then a few steps of all four tasks with DataLoader
workers."""

import json

import pytest
from conftest import TINY
from s3_emulator import s3_bucket, s3_emulator, s3_env  # noqa: F401
from test_prep import link_photos

from mtssl.config import load_config
from mtssl.data.shards import ShardFrames, ShardImages
from mtssl.prep.dataset import prepare
from mtssl.prep.options import PrepConfig
from mtssl.train import Trainer


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "prepared")
    return f"s3://{request.getfixturevalue('s3_bucket')}/prepared"


def test_trainer_steps_on_prepared_shards_with_workers(photo_pool, davis, tmp_path, output):
    src = tmp_path / "in"
    link_photos(photo_pool, src, 16)
    (src / "davis").mkdir()
    seq = next(iter(davis.lengths))
    (src / "davis" / seq).symlink_to(davis.root / "JPEGImages/480p" / seq)
    manifest = prepare(PrepConfig(input=str(src), output=output, short_side=96,
                                  shard_max_items=6, frames_per_video=6, frame_short_side=96,
                                  progress=False, workers=1))
    assert manifest["images"]["count"] == 16 and manifest["frames"]["count"] >= 1
    cfg = load_config("quickstart", TINY + [
        f"output.dir={tmp_path / 'run'}", "schedule.max_steps=2", "output.log_every=1",
        f"data.images={output}", f"data.frames={output}", "data.num_workers=2"])
    trainer = Trainer(cfg)
    state = trainer.train()
    assert isinstance(trainer.data.source("images"), ShardImages)
    assert isinstance(trainer.data.source("frames"), ShardFrames)
    assert state.step == 2 and all(n == 8 for n in state.samples.values())
    log = (cfg.run_dir / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in log.splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert set(records[-1]["tasks"]) == set(cfg.enabled_tasks())
