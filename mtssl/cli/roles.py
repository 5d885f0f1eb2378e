"""`mtssl coordinator` and `mtssl worker`: the two roles of a distributed run (one per pod)."""

from __future__ import annotations

import argparse

from mtssl.cli.common import (
    add_config_args,
    add_out_arg,
    add_resume_args,
    load,
    report_pretrain,
    start_options,
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="distributed run: the coordinator (rank 0)",
                       description="Own the canonical parameters and the per-task RMSProp states, "
                                   "apply the workers' gradients, checkpoint, account device-hours, "
                                   "and decide when to stop. Rendezvous on MTSSL_COORDINATOR_PORT.")
    add_config_args(p, "quickstart")
    add_out_arg(p)
    add_resume_args(p)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("worker", help="distributed run: one worker of one task",
                       description="Compute one task's gradients on this worker's slice of every "
                                   "batch, for the coordinator at MTSSL_COORDINATOR_ADDR/PORT.")
    add_config_args(p, "quickstart")
    add_out_arg(p)
    p.add_argument("--task", help="the task (default: MTSSL_TASK)")
    p.add_argument("--index", type=int, help="0-based index within the task (default: "
                                             "MTSSL_WORKER_INDEX; needed when the task has several)")
    p.set_defaults(func=cmd_worker)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from mtssl.distributed.coordinator import Coordinator
    from mtssl.env import role_env
    from mtssl.signals import StopOnSignal
    from mtssl.train import TrainingError
    cfg = load(args)
    hint = f"continue with: mtssl launch --local --config {cfg.run_dir / 'config.yaml'} --resume"
    with StopOnSignal() as stop:
        coordinator = Coordinator(cfg, role_env(cfg), **start_options(args))
        stop.bind(coordinator.request_stop)
        try:
            reason = coordinator.run()
        except TrainingError:
            print(f"run directory: {cfg.run_dir} (step {coordinator.state.step}); {hint}")
            raise
    print(f"run directory: {cfg.run_dir} (step {coordinator.state.step}, {reason}); {hint}")
    if stop.received:
        # A clean stop on request (Kubernetes sends SIGTERM): the final checkpoint is written.
        return 0
    report_pretrain(cfg, args)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from mtssl.distributed.worker import Worker
    from mtssl.env import role_env
    cfg = load(args)
    Worker(cfg, role_env(cfg, task=args.task, index=args.index, worker=True)).run()
    return 0
