"""Issue 12: bf16 autocast (trunk.precision), device-side metrics, the per-step finite check."""

import math

import pytest
import torch

from mtssl.config import ConfigError
from mtssl.models.lasso import TapMix
from mtssl.runlog import Accumulator
from mtssl.train import TrainingError, check_finite, task_gradients


def one_step(cfg):
    """Step 0 of every task: (loss, metrics) per task, read as floats."""
    from mtssl.data.sources import TaskData
    from mtssl.models.multitask import MultiTaskNet
    torch.manual_seed(cfg.seed)
    model = MultiTaskNet.from_config(cfg).train()
    params, owners, data = dict(model.named_parameters()), model.owned_names(), TaskData(cfg)
    out = {}
    for task in model.tasks:
        batch = next(iter(data.stream(task, stop_batch=1)))
        batch.pop("skipped")
        grads, loss, metrics = task_gradients(model, task, batch, cfg=cfg, params=params,
                                              names=owners[task], step=0)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values()), metrics
        assert all(g.dtype == params[n].dtype for n, g in grads.items())
        out[task] = float(loss), {k: float(v) for k, v in metrics.items()}
    return out


def test_a_bf16_step_runs_on_the_cpu_and_its_losses_are_close_to_fp32(tiny_config):
    fp32 = one_step(tiny_config())
    bf16 = one_step(tiny_config("trunk.precision=bf16"))
    for task, (loss, _) in fp32.items():
        assert math.isfinite(bf16[task][0])
        # Exemplar's semihard negative is a discrete choice that bf16 can flip in a 4-image
        # batch: |bf16 - fp32| was 0.010-0.047 on seeds 0-3 with shared or private draws.
        tolerance = 0.06 if task == "exemplar" else 0.02
        assert bf16[task][0] == pytest.approx(loss, rel=0.05, abs=tolerance), task


def test_precision_is_validated(tiny_config):
    with pytest.raises(ConfigError, match="precision"):
        tiny_config("trunk.precision=fp16")


def test_lasso_mix_takes_taps_of_mixed_dtypes():
    mix = TapMix(num_taps=3)
    taps = {"a": torch.ones(2, 4, 3, 3), "b": torch.ones(2, 4, 3, 3, dtype=torch.bfloat16),
            "c": torch.ones(2, 4, 3, 3, dtype=torch.bfloat16)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mix(taps)
    assert out.shape == (2, 4, 3, 3) and torch.isfinite(out).all()


def test_the_window_records_device_tensors_as_it_records_floats():
    host, device = Accumulator(), Accumulator()
    steps = [("a", 1.0, {"acc": 0.5}), ("b", 2.0, {"iou": 0.25, "x": 1.0}), ("a", 3.0, {"acc": 1.0})]
    for task, loss, metrics in steps:
        host.add(task, loss, 4, metrics)
        device.add(task, torch.tensor(loss), 4, {k: torch.tensor(v) for k, v in metrics.items()})
    want, got = host.record(7, 0.5, 2.0), device.record(7, 0.5, 2.0)
    assert got["tasks"].keys() == want["tasks"].keys()
    assert {k: v for k, v in got.items() if k != "tasks"} == {k: v for k, v in want.items()
                                                              if k != "tasks"}
    for t in want["tasks"]:
        assert got["tasks"][t] == pytest.approx(want["tasks"][t])
    with pytest.raises(ValueError, match="metrics"):
        device.add("a", 1.0, 4, {"other": 1.0})


def test_one_finite_check_per_step_names_the_first_bad_task_and_parameter():
    ok = (torch.tensor(1.0), {"w": torch.ones(3), "b": torch.ones(2)})
    check_finite(5, {"a": ok, "b": ok})
    huge = (torch.tensor(1.0), {"w": torch.full((4,), 3e38)})  # finite, but its norm overflows
    check_finite(5, {"a": huge})
    bad_grad = (torch.tensor(1.0), {"w": torch.ones(3), "b": torch.tensor([0.0, math.nan])})
    with pytest.raises(TrainingError, match=r"non-finite gradient for b in task 'c' at step 5"):
        check_finite(5, {"a": ok, "c": bad_grad, "d": ok})
    bad_loss = (torch.tensor(math.inf), {"w": torch.ones(3)})
    with pytest.raises(TrainingError, match=r"non-finite loss \(inf\) in task 'd' at step 6"):
        check_finite(6, {"a": ok, "d": bad_loss, "c": bad_grad})
