"""A fifth task registered from the test suite only (tests/toy_task.py) runs through training,
distributed sync, the pre-training report and the Kubernetes roles, and registering it
changes nothing an existing config or checkpoint means."""

import contextlib
import importlib
import json
import os
from pathlib import Path

import pytest
import yaml
from test_distributed import SYNC, Launch, launches, logged_steps  # noqa: F401  (fixture)

from mtssl.config import from_dict, load_config, to_dict
from mtssl.task_registry import TASKS, register, unregister
from mtssl.train import task_seed

TESTS = Path(__file__).resolve().parent
TOY = ["task_modules=[toy_task]", "tasks.toy.batch_size=4", "tasks.toy.image_size=32"]
# toy beside one built-in task: the one whose report figure needs no calibration
PAIR = ["tasks.relative_position.enabled=false", "tasks.colorization.enabled=false",
        "tasks.exemplar.enabled=false"]


@contextlib.contextmanager
def toy_registered():
    """Registered for the block only, so the other tests see the built-in tasks alone."""
    toy = importlib.import_module("toy_task")  # registers on first import, as task_modules does
    if "toy" not in TASKS:
        register(toy.TASK)
    try:
        yield
    finally:
        unregister("toy")


@pytest.fixture
def toy():
    with toy_registered():
        yield


def test_registering_a_task_changes_no_existing_config_or_checkpoint(tiny_config):
    before = tiny_config()
    saved = to_dict(before)  # what a checkpoint and config.yaml hold
    with toy_registered():
        after, reloaded = tiny_config(), from_dict(saved)
        assert after == before == reloaded and to_dict(after) == saved
        # Pinned on purpose, not read from the registry (which now holds the toy too): the
        # built-in tasks, their order and their ids 0..3 are the contract existing configs,
        # checkpoints and stream seeds rely on.
        assert after.enabled_tasks() == before.enabled_tasks() == [
            "relative_position", "colorization", "exemplar", "motion_segmentation"]
        assert not after.tasks.toy.enabled and after.harmonization.toy is False
        assert [task_seed(0, 7, TASKS[t].task_id) for t in after.enabled_tasks()] == [
            task_seed(0, 7, i) for i in range(4)]  # the stream ids and seeds of before the ids
        assert tiny_config(*TOY).enabled_tasks()[-1] == "toy"  # named: it runs
    assert "toy" not in TASKS and "toy" not in to_dict(tiny_config())["tasks"]


def test_toy_trains_and_is_reported(tiny_config, toy):
    from mtssl.pretrain_report import write_report
    from mtssl.train import Trainer
    cfg = tiny_config(*TOY, *PAIR, "schedule.max_steps=2", "output.log_every=1",
                      "output.report=false", "health.samples=4")
    assert cfg.enabled_tasks() == ["motion_segmentation", "toy"]
    Trainer(cfg).train()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").open()]
    assert set(records[-1]["tasks"]) == {"motion_segmentation", "toy"}
    assert yaml.safe_load((cfg.run_dir / "config.yaml").read_text())["task_modules"] == ["toy_task"]
    report = write_report(cfg.run_dir).read_text()
    assert "| toy |" in report and "## Flip" in report and "## Motion segmentation" in report


def test_toy_runs_distributed_in_sync(tmp_path, launches):  # noqa: F811
    """The workers and coordinator import the toy through the config's task_modules."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    run = launches(tmp_path / "sync", SYNC + TOY + ["tasks.colorization.enabled=false",
                                                    "schedule.max_steps=2"],
                   env={"PYTHONPATH": path})
    assert run.wait() == 0, run.output
    assert set(logged_steps(run.run_dir)[-1]["tasks"]) == {"motion_segmentation", "toy"}
    assert "toy/0" in run.output


def test_toy_gets_its_own_kubernetes_pods(toy):
    from mtssl.k8s import builders
    from mtssl.k8s.profiles import run_spec
    from mtssl.k8s.stages import training_overrides
    spec = run_spec("cpu-small", overrides=(*TOY, "tasks.toy.workers=2"))
    assert spec.tasks[-1] == ("toy", 2)
    roles = builders.pod_roles(spec)
    assert roles["toy"].args[:3] == ["worker", "--task", "toy"]
    assert yaml.safe_load(builders.config_yaml(spec.config))["task_modules"] == ["toy_task"]
    sets = training_overrides(images="embedded", frames="embedded", tasks=["toy"],
                              budget_gpu_hours=0, storage="", run="r")
    assert load_config("quickstart", [*TOY, *sets]).enabled_tasks() == ["toy"]
