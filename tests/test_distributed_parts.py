"""Distributed runtime pieces without processes: ranks, environment, messages, staleness gate,
the local launcher's plan."""

import random
import threading
import time

import pytest
import torch

from mtssl import env as envvars
from mtssl.distributed.launch import roles
from mtssl.distributed.protocol import CONTINUE, Layout, message_bytes, task_ranks, world_size
from mtssl.distributed.staleness import StalenessGate
from mtssl.distributed.worker import single_task_net
from mtssl.env import EnvError, role_env
from mtssl.models.multitask import MultiTaskNet

POOLS = ("tasks.relative_position.workers=2", "tasks.colorization.workers=1",
         "tasks.exemplar.workers=4", "tasks.motion_segmentation.workers=1")


def test_ranks_follow_task_order_and_pool_sizes(tiny_config):
    cfg = tiny_config(*POOLS)
    # Pinned on purpose: rank layout in stable task-id order (0..3) is what pods are launched by.
    assert task_ranks(cfg) == {"relative_position": [1, 2], "colorization": [3],
                               "exemplar": [4, 5, 6, 7], "motion_segmentation": [8]}
    assert world_size(cfg) == 9
    # a disabled task takes no ranks: later tasks move up
    cfg = tiny_config(*POOLS, "tasks.colorization.enabled=false")
    assert task_ranks(cfg)["exemplar"] == [3, 4, 5, 6] and world_size(cfg) == 8


def test_environment_is_read_and_checked(tiny_config):
    cfg = tiny_config(*POOLS, "distributed.port=1234", "metrics.port=9100")
    coord = role_env(cfg, environ={})
    assert (coord.addr, coord.port, coord.run, coord.metrics_port) == ("127.0.0.1", 1234,
                                                                       "quickstart", 9100)
    env = {envvars.ADDR: "coord.svc", envvars.PORT: "29999", envvars.RUN: "r7",
           envvars.METRICS_PORT: "0", envvars.TASK: "exemplar", envvars.INDEX: "3",
           envvars.DEVICE: "cpu"}
    w = role_env(cfg, worker=True, environ=env)
    assert (w.addr, w.port, w.run, w.metrics_port, w.task, w.index, w.device) == (
        "coord.svc", 29999, "r7", 0, "exemplar", 3, "cpu")
    assert role_env(cfg, worker=True, task="colorization", environ={}).index == 0
    bad = [({envvars.TASK: "exemplar"}, "has 4 workers"),
           ({envvars.TASK: "exemplar", envvars.INDEX: "4"}, r"in \[0, 3\]"),
           ({envvars.TASK: "nope"}, "not an enabled task"),
           ({}, "no task given"),
           ({envvars.TASK: "colorization", envvars.PORT: "http"}, "expected an integer"),
           ({envvars.TASK: "colorization", envvars.DEVICE: "tpu"}, "MTSSL_DEVICE")]
    for environ, message in bad:
        with pytest.raises(EnvError, match=message):
            role_env(cfg, worker=True, environ=environ)


@pytest.mark.parametrize("sets", [(), ("trunk.channels_last=true",)], ids=["nchw", "nhwc"])
def test_messages_carry_parameters_buffers_and_exact_header(tiny_config, sets):
    cfg = tiny_config(*sets)
    torch.manual_seed(0)
    coord = MultiTaskNet.from_config(cfg)
    with torch.no_grad():
        coord.heads["colorization"].prior.uniform_()  # buffers travel too
    worker = single_task_net(cfg, "colorization")
    layout = Layout.of(coord, "colorization")
    assert Layout.of(worker, "colorization") == layout  # the worker's names and shapes agree
    down = layout.pack_down(torch.empty(layout.down_size), (CONTINUE, 2**40 + 3, 7, 123),
                            dict(coord.named_parameters()), dict(coord.named_buffers()))
    assert Layout.header(down) == (CONTINUE, 2**40 + 3, 7, 123)
    layout.unpack_down(down, dict(worker.named_parameters()), dict(worker.named_buffers()))
    want = coord.state_dict()
    for name, value in worker.state_dict().items():
        assert torch.equal(value, want[name]), name

    # up: two workers' messages summed by the reduce -> mean gradients, only where any had one
    params = [n for n, _ in layout.params]
    g1 = {n: torch.full(s, 1.0) for n, s in layout.params[:-1]}  # last parameter: no gradient
    g2 = {n: torch.full(s, 3.0) for n, s in layout.params[:-1]}
    bufs = dict(worker.named_buffers())
    total = (layout.pack_up(torch.empty(layout.up_size), g1, bufs)
             + layout.pack_up(torch.empty(layout.up_size), g2, bufs))
    grads, buffers = layout.unpack_up(total, 2)
    assert set(grads) == set(params[:-1])
    assert all(torch.equal(g, torch.full_like(g, 2.0)) for g in grads.values())
    assert all(torch.allclose(buffers[n], bufs[n].float()) for n in buffers)
    assert message_bytes(layout, 2) == 8 * (layout.down_size + layout.up_size)


def run_gate(durations: dict[str, float], *, max_staleness: int, rounds: int):
    gate = StalenessGate(max_staleness=max_staleness, rounds_left=rounds)
    log, seen_in_flight = [], []

    def serve(task):
        rng = random.Random(task)
        while gate.start(task) is not None:
            seen_in_flight.append(len(gate.in_flight))
            time.sleep(durations[task] * rng.uniform(0.5, 1.5))
            log.append((task, gate.finish(task)))
    threads = [threading.Thread(target=serve, args=(t,)) for t in durations]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert not any(th.is_alive() for th in threads), "gate deadlocked"
    return log, seen_in_flight


def test_staleness_gate_bounds_staleness_and_lets_fast_tasks_run_ahead():
    durations = {"fast": 0.002, "mid": 0.006, "slow": 0.02}
    log, _ = run_gate(durations, max_staleness=3, rounds=60)
    assert len(log) == 60
    assert max(s for _, s in log) <= 3
    counts = {t: sum(1 for task, _ in log if task == t) for t in durations}
    assert counts["fast"] > counts["slow"] >= 1
    # a larger bound lets the fast task further ahead
    log8, _ = run_gate(durations, max_staleness=8, rounds=60)
    assert max(s for _, s in log8) <= 8
    assert sum(1 for t, _ in log8 if t == "fast") > counts["fast"]


def test_staleness_zero_serialises_tasks():
    log, in_flight = run_gate({"a": 0.002, "b": 0.003, "c": 0.001}, max_staleness=0, rounds=20)
    assert len(log) == 20 and all(s == 0 for _, s in log) and max(in_flight) == 1


def test_launcher_plan_matches_pods(tiny_config):
    cfg = tiny_config("tasks.relative_position.workers=2", "tasks.exemplar.enabled=false")
    plan = roles(cfg, config="c.yaml", overrides=["a=1"], addr="127.0.0.1", port=4000, run="r",
                 metrics_base=9100, resume=True)
    assert [r.name for r in plan] == ["coordinator", "relative_position/0", "relative_position/1",
                                      "colorization/0", "motion_segmentation/0"]
    assert plan[0].args == ["coordinator", "--config", "c.yaml", "--set", "a=1", "--resume"]
    assert plan[2].args == ["worker", "--task", "relative_position", "--config", "c.yaml",
                            "--set", "a=1"]
    assert plan[2].env == {envvars.ADDR: "127.0.0.1", envvars.PORT: "4000", envvars.RUN: "r",
                           envvars.METRICS_PORT: "9102", envvars.TASK: "relative_position",
                           envvars.INDEX: "1"}
    assert [int(r.env[envvars.METRICS_PORT]) for r in plan] == [9100, 9101, 9102, 9103, 9104]
    off = roles(cfg, config="c.yaml", overrides=[], addr="h", port=1, run="r", metrics_base=0)
    assert {r.env[envvars.METRICS_PORT] for r in off} == {"0"}


def test_roles_agree_on_the_data_that_decides_samples_not_on_loader_settings():
    """The coordinator refuses workers with "a different model or data config": the fingerprint
    covers the model sections and the data keys that choose samples, not loader settings."""
    from conftest import TINY

    from mtssl.config import load_config
    layout = Layout(task="colorization", params=(("w", (2,)),), buffers=())
    base = load_config("quickstart", TINY)
    same = layout.fingerprint(base)
    for override in ("data.num_workers=2", "data.image_cache=0"):
        assert layout.fingerprint(load_config("quickstart", [*TINY, override])) == same
    flipped = f"data.shared_draws={str(not base.data.shared_draws).lower()}"
    for override in ("data.images=/elsewhere", "data.holdout_every=7", "seed=9", flipped):
        assert layout.fingerprint(load_config("quickstart", [*TINY, override])) != same


def test_env_is_low_in_the_dependency_order():
    """mtssl.env reads every variable of the package's own and imports no config at run time
    (config.py takes its device check from it)."""
    import ast
    import inspect

    from mtssl import config, env
    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(env)))
                if isinstance(n, ast.ImportFrom) and n.col_offset == 0}
    assert "mtssl.config" not in imported
    assert config.valid_device is env.valid_device
