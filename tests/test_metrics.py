"""Device-second accounting, the GPU-hour budget and milestones, and the Prometheus metrics, in
the single-process trainer."""

import itertools
import socket
import urllib.request

import pytest
import torch

from mtssl import train
from mtssl.accounting import SHARED, DeviceClock, budget_check, crossed_marks, milestone_name, remaining_hours
from mtssl.checkpoint import CheckpointStore
from mtssl.metrics import Metrics, alpha_sparsity
from mtssl.storage import open_storage
from mtssl.train import Trainer

CONTRACT = {  # metric family -> its labels (notes/contracts.md)
    "mtssl_device_seconds": {"run", "task", "role", "device_type"},
    "mtssl_steps": {"run", "task", "role"}, "mtssl_samples": {"run", "task", "role"},
    "mtssl_task_loss": {"run", "task"}, "mtssl_step_duration_seconds": {"run", "task", "role"},
    "mtssl_staleness_steps": {"run", "task"},
    "mtssl_lasso_alpha_sparsity_ratio": {"run", "task"}, "mtssl_budget_gpu_hours": {"run"},
    "mtssl_budget_remaining_gpu_hours": {"run"}, "mtssl_gpu_hours_total": {"run", "task"},
    "mtssl_last_step_timestamp_seconds": {"run", "task"},
}


def test_milestones_names_and_budget():
    assert milestone_name(0.5, every_hours=0.5) == "gpuh_0000.50"
    assert milestone_name(1250.0, every_hours=250) == "gpuh_1250.00"
    assert milestone_name(0.0003, every_hours=0.0001) == "gpuh_0000.0003"
    assert crossed_marks(0.4, 1.6, every_hours=0.5) == [0.5, 1.0, 1.5]
    assert crossed_marks(0.5, 0.99, every_hours=0.5) == []  # 0.5 was passed before
    assert crossed_marks(0.0, 0.3, every_hours=0.1) == pytest.approx([0.1, 0.2, 0.3])
    assert budget_check(0, 5400, budget_hours=2.0, every_hours=1.0) == (["gpuh_0001.00"], False)
    assert budget_check(5400, 7200, budget_hours=2.0, every_hours=None) == ([], True)
    assert remaining_hours(None, 3.0) is None and remaining_hours(2.0, 3.0) == 0.0


def test_device_clock_counts_devices_times_wall_seconds():
    ticks = iter([10.0, 12.5, 13.0])
    clock = DeviceClock(devices=4, clock=lambda: next(ticks))
    assert clock.lap() == 10.0 and clock.lap() == 2.0


def test_alpha_sparsity():
    assert alpha_sparsity(torch.tensor([0.0, 5e-4, -2e-3, 1.0])) == 0.5
    assert alpha_sparsity(None) == 0.0


def families(text: str) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_names_labels_and_http(tmp_path):
    m = Metrics(run="r1", role="worker", device_type="cpu")
    m.device_seconds("colorization", 2.5)
    m.step("colorization", seconds=0.3, samples=8)
    m.loss("colorization", 1.5)
    m.staleness("colorization", 2)
    m.alpha("colorization", torch.tensor([0.0, 1.0]))
    m.budget(budget_hours=10.0, used_hours=4.0)
    m.gpu_hours("colorization", 4.0)
    port = m.serve(port=free_port(), host="127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    got = families(text)
    assert set(CONTRACT) <= set(got), set(CONTRACT) - set(got)
    for name, labels in CONTRACT.items():
        for sample in got[name]:
            if not sample.name.endswith("_created"):
                assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
                assert sample.labels["run"] == "r1"
    value = {s.name: s.value for f in got.values() for s in f if "le" not in s.labels}
    assert value["mtssl_device_seconds_total"] == 2.5
    assert value["mtssl_samples_total"] == 8 and value["mtssl_steps_total"] == 1
    assert value["mtssl_budget_remaining_gpu_hours"] == 6.0
    assert value["mtssl_lasso_alpha_sparsity_ratio"] == 0.5
    # no budget configured: the budget series stay absent
    quiet = Metrics(run="r2", role="trainer", device_type="cpu")
    quiet.budget(budget_hours=None, used_hours=1.0)
    assert quiet.value("mtssl_budget_gpu_hours") != quiet.value("mtssl_budget_gpu_hours")  # NaN


def fixed_clock(monkeypatch):
    """Every lap of the trainer's device clock lasts exactly one second."""
    monkeypatch.setattr(train, "DeviceClock",
                        lambda: DeviceClock(clock=itertools.count().__next__))


def test_trainer_accounts_device_seconds_and_metrics(tiny_config):
    cfg = tiny_config("schedule.max_steps=3", "tasks.exemplar.enabled=false")
    trainer = Trainer(cfg)
    state = trainer.train()
    tasks = trainer.model.tasks
    assert set(state.device_seconds) == {*tasks, SHARED}
    m = trainer.metrics
    for task in tasks:
        assert m.value("mtssl_device_seconds_total", task=task, role="trainer",
                       device_type="cpu") == state.device_seconds[task]
        assert m.value("mtssl_steps_total", task=task, role="trainer") == 3
        assert m.value("mtssl_samples_total", task=task, role="trainer") == state.samples[task]
        assert m.value("mtssl_gpu_hours_total", task=task) == state.device_seconds[task] / 3600
    ckpt, _ = CheckpointStore(open_storage(cfg.storage_uri)).load_latest()
    assert ckpt["device_seconds"] == state.device_seconds
    assert ckpt["positions"] == {t: 3 for t in tasks}
    # totals survive a resume and keep growing from there
    resumed = Trainer(tiny_config("schedule.max_steps=4", "tasks.exemplar.enabled=false"),
                      resume=True)
    assert resumed.state.device_seconds == state.device_seconds
    after = resumed.train()
    assert all(after.device_seconds[t] > state.device_seconds[t] for t in tasks)


def test_trainer_stops_at_the_gpu_budget_with_milestones(tiny_config, monkeypatch):
    fixed_clock(monkeypatch)
    # 2 tasks: each step adds 1 s per task + 1 s shared = 3 device-seconds
    cfg = tiny_config("schedule.max_steps=100", "tasks.exemplar.enabled=false",
                      "tasks.relative_position.enabled=false",
                      f"budget.gpu_hours={10 / 3600}", f"milestones.every_gpu_hours={4 / 3600}")
    state = Trainer(cfg).train()
    assert state.step == 4  # 12 s >= 10 s after step 4, not after step 3 (9 s)
    store = CheckpointStore(open_storage(cfg.storage_uri))
    marks = [(e["step"], e["milestone"]) for e in store.milestones()]
    names = [milestone_name(h / 3600, every_hours=4 / 3600) for h in (4, 8, 12)]
    assert marks == list(zip([2, 3, 4], names))  # 6 s > 4, 9 s > 8, 12 s >= 12
    ckpt, step = store.load_latest()
    assert step == 4 and sum(ckpt["device_seconds"].values()) == 13  # + the lap closing the run
    # resuming an exhausted run trains no further
    again = Trainer(cfg, resume=True).train()
    assert again.step == 4
