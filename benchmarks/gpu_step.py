"""The training step's cost against the tasks' own forward+backward, on a GPU or the CPU (issue 12).

    python benchmarks/gpu_step.py                                   # quickstart, auto device
    python benchmarks/gpu_step.py --config paper --device cuda --precision fp32,bf16
    python benchmarks/gpu_step.py --config quickstart --device cpu -o tasks.exemplar.batch_size=4

On one fixed set of batches (the first batch of each task's stream, drawn by the project's
samplers) it times, as medians over --steps rounds in which each part runs once in turn
(CUDA-synchronised on a GPU), per precision:
  * project step: every task's `task_gradients` (forward at trunk.precision, loss, per-task
    gradients) without per-task checks, one `check_finite` for the step, the loss and metrics
    into a `Accumulator` (mtssl/runlog.py), and the per-task RMSProp update: the loop as it should run;
  * the same with a finite check per task and the loss and metrics read as floats every step
    (the loop before issue 12: the cost of reading every value each step);
  * the tasks' own forward+backward alone (model(task, batch).loss.backward(), same precision);
  * the bare trunk's forward+backward over the same input tensors;
  * ratios step/alone and step/trunk, peak device memory of the step (CUDA), images/s;
and each task's sampler throughput on one CPU core against what the step consumes
(batch / step time). Prints one table; on the CPU it is labelled CPU (slow; not GPU figures).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from mtssl.config import load_config
from mtssl.data.sources import TaskData
from mtssl.eval.report import table_text
from mtssl.models.multitask import MultiTaskNet
from mtssl.optim import PerTaskRMSProp
from mtssl.precision import autocast
from mtssl.runlog import Accumulator
from mtssl.tasks import TASKS
from mtssl.train import check_finite, resolve_device, task_gradients, to_device


def images(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (N, 3, H, W): pairs, views and patch grids go through as one batch."""
    return x.reshape(-1, *x.shape[-3:])


def timed(fns: dict, repeats: int, device: torch.device, warmup: int = 1) -> dict[str, tuple[float, int]]:
    """Median seconds of each fn() over `repeats`, and its peak device memory (bytes; 0 on the
    CPU). The functions take turns, one call each per round, so a machine whose speed drifts
    (a shared CPU, a GPU's clocks) slows them alike and the ratios stay fair."""
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0)
    for _ in range(warmup):  # allocator, autograd and kernel caches
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), peaks[name]) for name, t in times.items()}


def sampler_rates(cfg, data: TaskData, tasks: list[str], batches: int) -> tuple[dict, dict]:
    """First batch of each task (the fixed batches) and its sampler's samples/s on one core."""
    first, rate = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for task in tasks:
            it = iter(data.stream(task, stop_batch=batches + 1))
            first[task] = next(it)  # also the warm-up (decoding, caches)
            first[task].pop("skipped")
            t0 = time.perf_counter()
            n = sum(len(b[TASKS[task].input_key]) for b in it)
            rate[task] = n / (time.perf_counter() - t0) if n else float("nan")
    finally:
        torch.set_num_threads(threads)
    return first, rate


def measure(cfg, model, opt, batches, device, repeats: int) -> dict:
    params, owners = dict(model.named_parameters()), model.owned_names()
    precision = cfg.trunk.precision

    def project_step():
        window, results, grads = Accumulator(), {}, {}
        for t in model.tasks:
            g, loss, metrics = task_gradients(model, t, batches[t], cfg=cfg, params=params,
                                              names=owners[t], step=0, check=False)
            grads[t], results[t] = g, (loss, g)
            window.add(t, loss, len(batches[t][TASKS[t].input_key]), metrics)
        check_finite(0, results)
        opt.step(grads)

    def step_with_reads():
        grads = {}
        for t in model.tasks:
            grads[t], loss, metrics = task_gradients(model, t, batches[t], cfg=cfg, params=params,
                                                     names=owners[t], step=0)
            float(loss), [float(v) for v in metrics.values()]
        opt.step(grads)

    def gradients():
        return {t: task_gradients(model, t, batches[t], cfg=cfg, params=params, names=owners[t],
                                  step=0, check=False) for t in model.tasks}

    computed = gradients()  # fixed inputs for the two parts below

    def finite_check():
        check_finite(0, {t: (loss, g) for t, (g, loss, _) in computed.items()})

    def update():
        opt.step({t: g for t, (g, _, _) in computed.items()})

    def tasks_alone():
        for t in model.tasks:
            model.zero_grad(set_to_none=True)
            with autocast(precision, device):
                out = model(t, batches[t])
            out.loss.backward()

    def trunk_only():
        for t in model.tasks:
            model.zero_grad(set_to_none=True)
            with autocast(precision, device):
                out = model.trunk(images(batches[t][TASKS[t].input_key])).out
            out.float().sum().backward()

    r = timed({"step": project_step, "reads": step_with_reads, "gradients": gradients,
               "check": finite_check, "update": update, "alone": tasks_alone, "trunk": trunk_only},
              repeats, device)
    model.zero_grad(set_to_none=True)
    n_images = sum(images(batches[t][TASKS[t].input_key]).shape[0] for t in model.tasks)
    return {**{name: seconds for name, (seconds, _) in r.items()}, "peak": r["step"][1],
            "images_s": n_images / r["step"][0]}


def main(argv: list[str] | None = None) -> list[list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("-o", "--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="fp32,bf16",
                    help="comma-separated trunk.precision values, one table column each")
    ap.add_argument("--steps", type=int, default=10, help="timed repeats (median)")
    ap.add_argument("--sampler-batches", type=int, default=6)
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    device = resolve_device(args.device)
    cfgs = {p: load_config(args.config, [*args.overrides, f"trunk.precision={p}"]) for p in precisions}
    cfg = cfgs[precisions[0]]
    torch.manual_seed(cfg.seed)
    model = MultiTaskNet.from_config(cfg).to(device).train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    opt = PerTaskRMSProp(params=dict(model.named_parameters()), owners=model.owned_names(),
                         lr={t: 1e-6 for t in model.tasks}, decay=cfg.optimizer.decay,
                         eps=cfg.optimizer.eps, momentum=cfg.optimizer.momentum,
                         weight_decay=cfg.optimizer.weight_decay)
    host_batches, rate = sampler_rates(cfg, TaskData(cfg), model.tasks, args.sampler_batches)
    batches = {t: to_device(b, device) for t, b in host_batches.items()}
    results = {p: measure(cfgs[p], model, opt, batches, device, args.steps) for p in precisions}

    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    t = cfg.trunk
    print(f"gpu_step: config {args.config} (trunk {t.units or t.depth} width {t.width} "
          f"os {t.output_stride}), {where}, torch {torch.__version__}, median of {args.steps}, "
          f"{datetime.date.today()}" + ("  -- CPU timings, not GPU figures" if device.type != "cuda" else ""))
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    rows = [
        ["project step (ms)", *(ms(r["step"]) for r in results.values())],
        ["  with per-task checks + float reads (ms)", *(ms(r["reads"]) for r in results.values())],
        ["  part: every task's gradients (ms)", *(ms(r["gradients"]) for r in results.values())],
        ["  part: the step's finite check (ms)", *(ms(r["check"]) for r in results.values())],
        ["  part: per-task RMSProp update (ms)", *(ms(r["update"]) for r in results.values())],
        ["tasks' own fwd+bwd alone (ms)", *(ms(r["alone"]) for r in results.values())],
        ["bare trunk fwd+bwd (ms)", *(ms(r["trunk"]) for r in results.values())],
        ["step/alone", *(f"{r['step'] / r['alone']:.2f}" for r in results.values())],
        ["step/trunk", *(f"{r['step'] / r['trunk']:.2f}" for r in results.values())],
        ["peak memory of the step (MiB)", *((f"{r['peak'] / 2**20:.0f}" if r["peak"] else "n/a (CPU)")
                                            for r in results.values())],
        ["images/s (trunk inputs)", *(f"{r['images_s']:.0f}" for r in results.values())],
    ]
    for task in model.tasks:
        batch = getattr(cfg.tasks, task).batch_size
        rows.append([f"{task} sampler/core vs needed (samples/s)",
                     *(f"{rate[task]:.0f} vs {batch / r['step']:.0f} = {rate[task] * r['step'] / batch:.1f}x"
                       for r in results.values())])
    header = ["measure", *precisions]
    print(table_text(header, rows), flush=True)
    return [header, *rows]


if __name__ == "__main__":
    main()
