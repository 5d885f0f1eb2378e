"""The single-process trainer: a full tiny run, exact resume, failure handling, the paper config."""

import json

import pytest
import torch

from mtssl.checkpoint import CheckpointStore
from mtssl.cli import main
from mtssl.config import load_config
from mtssl.storage import open_storage
from mtssl.train import Trainer, TrainingError


def params_of(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_tiny_run_writes_config_metrics_checkpoint(tiny_config):
    cfg = tiny_config("schedule.max_steps=4", "output.log_every=2", "output.checkpoint_every=2")
    state = Trainer(cfg).train()
    assert state.step == 4 and all(n == 16 for n in state.samples.values())
    assert (cfg.run_dir / "config.yaml").exists()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert set(records[-1]["tasks"]) == set(cfg.enabled_tasks())
    ckpts = CheckpointStore(open_storage(cfg.storage_uri)).list_checkpoints()
    assert [c["step"] for c in ckpts] == [2, 4]
    # the embedded pool has 5 grayscale photos: colorization skips and counts them
    assert set(state.skipped["colorization"].values()) == {"grayscale"}


@pytest.mark.parametrize("shared", ["true", "false"])
def test_resume_gives_the_same_steps_as_an_uninterrupted_run(tiny_config, shared):
    sets = ("schedule.max_steps=4", "output.checkpoint_every=100", f"data.shared_draws={shared}")
    straight = Trainer(tiny_config(*sets, run="a"))
    straight.train()

    first = Trainer(tiny_config(*sets, run="b"))
    first.train(stop_at=2)  # interrupted after step 2, checkpointed
    resumed = Trainer(tiny_config(*sets, run="b"), resume=True)
    assert resumed.resumed and resumed.state.step == 2
    resumed.train()
    a, b = params_of(straight), params_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert straight.opt.steps == resumed.opt.steps


def test_resume_refuses_a_changed_model(tiny_config):
    Trainer(tiny_config("schedule.max_steps=1", run="c")).train()
    with pytest.raises(TrainingError, match="trunk.width"):
        Trainer(tiny_config("schedule.max_steps=2", "trunk.width=0.125", run="c"), resume=True)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, monkeypatch):
    cfg = tiny_config("schedule.max_steps=6", "output.checkpoint_every=2")
    trainer = Trainer(cfg)
    head = trainer.model.heads["exemplar"]
    original = head.forward

    def poisoned(batch, features):
        out = original(batch, features)
        if trainer.state.step >= 3:
            out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(head, "forward", poisoned)
    with pytest.raises(TrainingError, match="task 'exemplar' at step 3"):
        trainer.train()
    _, step = CheckpointStore(open_storage(cfg.storage_uri)).load_latest()
    assert step == 2


def test_time_budget_stops_with_a_checkpoint(tiny_config):
    cfg = tiny_config("schedule.max_steps=1000", "schedule.time_budget_s=0.5")
    state = Trainer(cfg).train()
    assert 1 <= state.step < 1000
    _, step = CheckpointStore(open_storage(cfg.storage_uri)).load_latest()
    assert step == state.step


def test_cli_quickstart_path_and_report(tmp_path, capsys):
    from conftest import TINY
    args = ["train", "--config", "quickstart", "--out", str(tmp_path / "q")]
    for s in TINY + ["schedule.max_steps=3", "output.log_every=1"]:
        args += ["--set", s]
    assert main(args) == 0
    report = (tmp_path / "q" / "report" / "report.md").read_text()
    for part in ("curves.png", "colorization.png", "motion.png", "alpha.png", "| exemplar |"):
        assert part in report
    assert "--resume" in capsys.readouterr().out


def test_paper_config_builds_at_full_size_on_the_meta_device():
    """The paper's shapes without its memory: parameters on the meta device hold no data."""
    from mtssl.colour import ab_bins
    from mtssl.models.multitask import MultiTaskNet
    ab_bins()  # cached on the CPU first: computing the gamut needs real tensors
    cfg = load_config("paper", ["output.dir=unused"])
    with torch.device("meta"):
        model = MultiTaskNet.from_config(cfg)
    assert len(model.trunk.tap_names) == 23 and model.trunk.out_channels == 1024
    assert model.heads["colorization"].conv1.out_channels == 4096
    assert sum(p.numel() for p in model.parameters()) > 200e6


# Peaks at 8.6 GB of RAM: not part of the default run (pytest -m full_size runs it).
@pytest.mark.full_size
def test_paper_config_builds_and_runs_one_step_at_reduced_input(tmp_path):
    cfg = load_config("paper", [
        f"output.dir={tmp_path}", "output.progress=false", "schedule.max_steps=1",
        "data.num_workers=0", "tasks.colorization.prior_batches=1",
        "tasks.relative_position.patch_size=32", "tasks.relative_position.gap=16",
        "tasks.relative_position.jitter=3", "tasks.relative_position.min_pixels=20000",
        "tasks.relative_position.max_pixels=40000", "tasks.relative_position.batch_size=2",
        "tasks.colorization.input_size=32", "tasks.colorization.batch_size=2",
        "tasks.exemplar.image_size=48", "tasks.exemplar.patch_size=32",
        "tasks.exemplar.batch_size=2", "tasks.motion_segmentation.frame_size=[32,48]",
        "tasks.motion_segmentation.batch_size=2"])
    trainer = Trainer(cfg)
    assert len(trainer.model.trunk.tap_names) == 23 and trainer.model.trunk.out_channels == 1024
    assert trainer.model.heads["colorization"].conv1.out_channels == 4096
    before = trainer.model.trunk.block3[0].conv2.weight.detach().clone()
    state = trainer.train()
    assert state.step == 1
    assert not torch.equal(before, trainer.model.trunk.block3[0].conv2.weight)


def test_trainer_runs_the_workers_feed_and_the_shared_loop(tiny_config, monkeypatch):
    """One loop (issue 10): in-process, each task's round is the distributed worker's TaskFeed,
    and every step goes through TrainingRun.after_step, the coordinator's own step logic."""
    from mtssl.distributed import worker
    from mtssl.train import TaskFeed, TrainingRun
    assert worker.TaskFeed is TaskFeed
    computed, stepped = [], []
    compute, after_step = TaskFeed.compute, TrainingRun.after_step
    monkeypatch.setattr(TaskFeed, "compute", lambda self, **kw: (
        computed.append((self.task, kw["step"])), compute(self, **kw))[1])
    monkeypatch.setattr(TrainingRun, "after_step", lambda self, scale: (
        stepped.append(self.state.step), after_step(self, scale))[1])
    cfg = tiny_config("schedule.max_steps=2", "health.enabled=false")
    Trainer(cfg).train()
    assert computed == [(t, s) for s in range(2) for t in cfg.enabled_tasks()]
    assert stepped == [1, 2]
