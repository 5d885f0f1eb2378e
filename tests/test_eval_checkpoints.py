"""Loading trunks for evaluation: checkpoint files, run directories, loose copies, random init,
architecture checks, pre-training hours, strict suite settings."""

import shutil

import pytest
import torch

from mtssl.checkpoint import CheckpointStore
from mtssl.config import ConfigError, load_config
from mtssl.eval.common import EvalError, load_trunk, pretrain_hours, random_trunk, suite_settings
from mtssl.storage import open_storage
from mtssl.train import Trainer


def train_tiny(run_dir, *extra, steps=2):
    """A briefly pre-trained tiny run (all four tasks) in run_dir; returns the Trainer."""
    from conftest import TINY
    cfg = load_config("quickstart", TINY + [f"output.dir={run_dir}", f"schedule.max_steps={steps}",
                                            "output.report=false", *extra])
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def save_milestones(trainer, hours: list[float]) -> list[str]:
    """Milestone checkpoints of the trainer's state as if `hours` device-hours had been spent."""
    store = CheckpointStore(open_storage(trainer.cfg.storage_uri))
    keys = []
    for i, h in enumerate(hours):
        state = trainer.checkpoint_state()
        state["device_seconds"] = {"relative_position": h * 3600 / 2, "shared": h * 3600 / 2}
        keys.append(store.save(state, step=trainer.state.step + i, milestone=f"gpuh_{h:07.2f}"))
    return keys


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("eval") / "run", steps=1)


def test_load_from_run_dir_checkpoint_file_and_loose_copy(tiny_run, tmp_path):
    run_dir = tiny_run.cfg.run_dir
    by_dir = load_trunk(str(run_dir))
    ckpt = next((run_dir / "checkpoints").glob("step_*.pt"))
    by_file = load_trunk(str(ckpt))
    assert by_dir.identity == by_file.identity and by_dir.identity.startswith("sha256:")
    assert by_dir.step == tiny_run.state.step and by_dir.lasso_mode == "lasso"
    expected = {k[len("trunk."):]: v for k, v in tiny_run.model.state_dict().items()
                if k.startswith("trunk.")}
    built = by_file.build().state_dict()
    assert all(torch.equal(built[k], expected[k]) for k in expected)
    assert by_dir.alpha.shape == (4, len(tiny_run.model.trunk.tap_names))
    loose = tmp_path / "copy.pt"
    shutil.copy(ckpt, loose)  # no manifest beside it: identified by its own digest
    assert load_trunk(str(loose)).identity == by_file.identity


def test_output_stride_changes_resolution_not_weights(tiny_run):
    loaded = load_trunk(str(tiny_run.cfg.run_dir))
    x = torch.randn(1, 3, 64, 64)
    a, b = loaded.build(8).eval(), loaded.build(16).eval()
    assert a(x).out.shape[-1] == 8 and b(x).out.shape[-1] == 4
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_different_architecture_is_a_clear_error(tiny_run, tmp_path):
    other = load_config("quickstart").trunk  # width 0.125, units [1,1,4]: not the tiny trunk
    with pytest.raises(EvalError, match="different architecture.*units \\[1, 1, 2\\].*expected "
                                        "units \\[1, 1, 4\\]"):
        load_trunk(str(tiny_run.cfg.run_dir), expected=other)
    # weights that do not fit the config they carry
    state = tiny_run.checkpoint_state()
    state["config"]["trunk"]["width"] = 0.125
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(EvalError, match="do not fit the architecture.*shape mismatch"):
        load_trunk(str(bad))


def test_only_the_trunk_section_of_the_saved_config_matters(tiny_run, tmp_path):
    state = tiny_run.checkpoint_state()
    state["config"]["distributed"] = {"backend": "retired-option"}  # training-only drift
    torch.save(state, tmp_path / "drift.pt")
    loaded = load_trunk(str(tmp_path / "drift.pt"))
    assert loaded.tasks == tuple(tiny_run.model.tasks) and loaded.lasso_mode == "lasso"
    state["config"]["trunk"]["widht"] = 0.5
    torch.save(state, tmp_path / "typo.pt")
    with pytest.raises(EvalError, match="'trunk.widht': unknown key"):
        load_trunk(str(tmp_path / "typo.pt"))


def test_not_a_checkpoint_and_missing_source(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(EvalError, match="not an mtssl pre-training checkpoint"):
        load_trunk(str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(EvalError, match="cannot be read as a checkpoint"):
        load_trunk(str(tmp_path / "junk.pt"))
    with pytest.raises(EvalError, match="no such checkpoint file"):
        load_trunk(str(tmp_path / "absent.pt"))
    with pytest.raises(EvalError, match="not a run directory"):
        load_trunk(str(tmp_path))


def test_corrupt_checkpoint_is_skipped_for_an_older_one(tmp_path):
    trainer = train_tiny(tmp_path / "r", "output.checkpoint_every=1", steps=2)
    newest = tmp_path / "r" / "checkpoints" / "step_000000002.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    assert load_trunk(str(tmp_path / "r")).step == 1
    with pytest.raises(EvalError, match="corrupt"):
        load_trunk(str(newest))
    assert trainer.state.step == 2


def test_random_init_is_seeded_and_labelled():
    arch = load_config("quickstart").trunk
    a, b, c = random_trunk(arch), random_trunk(arch), random_trunk(arch, seed=1)
    assert a.identity == b.identity != c.identity and a.is_random and a.hours == 0.0
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not all(torch.equal(a.weights[k], c.weights[k]) for k in a.weights)


def test_pretrain_hours_reads_device_seconds_else_wall_clock():
    assert pretrain_hours({"device_seconds": {"a": 1800.0, "shared": 1800.0}, "wall_s": 5.0}) \
        == (1.0, "device_hours")
    assert pretrain_hours({"wall_s": 7200.0}) == (2.0, "wall_hours")
    assert pretrain_hours({}) == (None, "none")


def test_suite_settings_are_strict_and_presets_differ():
    smoke, paper = suite_settings("imagenet", "smoke"), suite_settings("imagenet", "paper")
    assert (smoke.image_size, paper.image_size) == (64, 224)
    assert suite_settings("nyu", "smoke", ["iterations=7"]).iterations == 7
    with pytest.raises(ConfigError, match="'pascal.iteratons': unknown key"):
        suite_settings("pascal", "smoke", ["iteratons=3"])
    with pytest.raises(ConfigError, match="'imagenet.resize'"):
        suite_settings("imagenet", "smoke", ["resize=10"])
    with pytest.raises(ConfigError, match="unknown settings 'huge'"):
        suite_settings("nyu", "huge")
