"""Multi-task step cost against the bare trunk, and sampler throughput against consumption.

    python benchmarks/core_step.py                      # quickstart config
    python benchmarks/core_step.py --config paper --set tasks.colorization.batch_size=2 ...

Prints, measured in this one run on the same tensors:
  * multi-task step (4 losses, per-task gradients, per-task RMSProp) / bare trunk forward+backward
    over the same input tensors (target <= 1.10; the heads' own compute is part of the numerator);
  * multi-task step / the sum of each task's trunk+head forward+backward run alone (what the
    trainer's machinery: lasso mix, per-task gradient extraction and optimizers, adds);
  * each sampler's samples/s on one core against what the trainer consumes (target >= 3x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtssl.config import load_config
from mtssl.data.sources import TaskData
from mtssl.models.multitask import MultiTaskNet
from mtssl.optim import PerTaskRMSProp
from mtssl.tasks import TASKS
from mtssl.train import task_gradients


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, autograd graph caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sampler-batches", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    data = TaskData(cfg)
    model = MultiTaskNet.from_config(cfg)
    model.train()
    params = dict(model.named_parameters())
    owners = model.owned_names()
    opt = PerTaskRMSProp(params=params, owners=owners, lr={t: 1e-5 for t in model.tasks},
                         momentum=cfg.optimizer.momentum, eps=cfg.optimizer.eps)

    batches, sampler_rate = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # sampler throughput per core
    for task in model.tasks:
        stream = data.stream(task, stop_batch=args.sampler_batches + 1)
        it = iter(stream)
        first = next(it)  # warm-up (decoding, caches)
        t0 = time.perf_counter()
        n = sum(len(b[TASKS[task].input_key]) for b in it)
        sampler_rate[task] = n / (time.perf_counter() - t0)
        first.pop("skipped")
        batches[task] = first
    torch.set_num_threads(threads)

    def multitask_step():
        grads = {t: task_gradients(model, t, batches[t], cfg=cfg, params=params,
                                   names=owners[t], step=0)[0] for t in model.tasks}
        opt.step(grads)

    def trunk_only():
        for t in model.tasks:
            x = batches[t][TASKS[t].input_key]
            x = x.flatten(0, 1) if x.ndim == 5 else x  # pairs / view pairs go through as one batch
            model.zero_grad(set_to_none=True)
            model.trunk(x).out.sum().backward()

    def tasks_alone():
        for t in model.tasks:
            model.zero_grad(set_to_none=True)
            model(t, batches[t]).loss.backward()

    step_s = timed(multitask_step, args.repeats)
    trunk_s = timed(trunk_only, args.repeats)
    alone_s = timed(tasks_alone, args.repeats)
    print(f"config {args.config}: trunk {cfg.trunk.depth if cfg.trunk.units is None else cfg.trunk.units}"
          f" width {cfg.trunk.width} os {cfg.trunk.output_stride}; threads {torch.get_num_threads()}")
    print(f"multi-task step            {step_s * 1e3:9.1f} ms")
    print(f"bare trunk fwd+bwd         {trunk_s * 1e3:9.1f} ms   ratio step/trunk = {step_s / trunk_s:.2f}"
          "  (target <= 1.10)")
    print(f"tasks alone (trunk+heads)  {alone_s * 1e3:9.1f} ms   ratio step/alone = {step_s / alone_s:.2f}")
    print("sampler throughput on one core vs trainer consumption at this step time:")
    for task in model.tasks:
        consumed = getattr(cfg.tasks, task).batch_size / step_s
        print(f"  {task:20s} {sampler_rate[task]:8.1f} samples/s/core   consumes {consumed:8.1f}/s"
              f"   ratio {sampler_rate[task] / consumed:6.1f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
