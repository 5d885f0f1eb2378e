"""CLI: `mtssl coordinator`, `mtssl worker`, `mtssl launch --local` (heavy imports in handlers)."""

from __future__ import annotations

import argparse

from mtssl.cli import add_config_args, add_resume_args, add_start_args, load, start_options
from mtssl.k8s.commands import K8S_EPILOG, add_k8s_arguments, run_k8s

LAUNCH_EPILOG = """examples:
  mtssl launch --local --config quickstart --set tasks.colorization.workers=2
  mtssl launch --local --config runs/quickstart/config.yaml --resume
the same roles by hand (or in pods), with MTSSL_COORDINATOR_ADDR/PORT pointing at the coordinator:
  mtssl coordinator --config quickstart
  MTSSL_TASK=colorization MTSSL_WORKER_INDEX=0 mtssl worker --config quickstart
"""


def add_common(p: argparse.ArgumentParser, default_config: str | None = "quickstart") -> None:
    add_config_args(p, default_config)
    p.add_argument("--out", help="run directory (same as --set output.dir=...)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="distributed run: the coordinator (rank 0)",
                       description="Own the canonical parameters and the per-task RMSProp states, "
                                   "apply the workers' gradients, checkpoint, account device-hours, "
                                   "and decide when to stop. Rendezvous on MTSSL_COORDINATOR_PORT.")
    add_common(p)
    add_resume_args(p)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("worker", help="distributed run: one worker of one task",
                       description="Compute one task's gradients on this worker's slice of every "
                                   "batch, for the coordinator at MTSSL_COORDINATOR_ADDR/PORT.")
    add_common(p)
    p.add_argument("--task", help="the task (default: MTSSL_TASK)")
    p.add_argument("--index", type=int, help="0-based index within the task (default: "
                                             "MTSSL_WORKER_INDEX; needed when the task has several)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("launch", help="start a distributed run (coordinator + workers)",
                       epilog=LAUNCH_EPILOG + K8S_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Start the coordinator and tasks.<t>.workers workers per task: "
                                   "as local processes (--local) with the commands and variables "
                                   "their pods get, or on Kubernetes (--k8s).")
    # No default config: --k8s takes its profile's unless --config replaces it.
    add_common(p, None)
    p.add_argument("--local", action="store_true",
                   help="as processes on this machine (config default: quickstart)")
    add_start_args(p)
    add_k8s_arguments(p)
    p.set_defaults(func=cmd_launch)


def child_overrides(args) -> list[str]:
    return list(args.overrides) + ([f"output.dir={args.out}"] if args.out else [])


def cmd_coordinator(args) -> int:
    from mtssl.distributed.coordinator import Coordinator
    from mtssl.distributed.env import role_env
    from mtssl.train import TrainingError
    from mtssl.signals import StopOnSignal
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
    if cfg.output.report and not args.no_report:
        from mtssl.pretrain_report import write_report
        print(f"report: {write_report(cfg.run_dir)}")
    return 0


def cmd_worker(args) -> int:
    from mtssl.distributed.env import role_env
    from mtssl.distributed.worker import Worker
    cfg = load(args)
    Worker(cfg, role_env(cfg, task=args.task, index=args.index, worker=True)).run()
    return 0


def cmd_launch(args) -> int:
    import socket

    from mtssl.config import ConfigError
    from mtssl.distributed.env import role_env
    from mtssl.distributed.launch import LocalLauncher, check_leftovers, roles
    from mtssl.preflight import open_checked
    from mtssl.runlock import claim_run
    if args.k8s == args.local:
        raise ConfigError("", "mtssl launch: say where, --local (processes on this machine) "
                              "or --k8s (a Kubernetes cluster)")
    if args.k8s:
        return run_k8s(args)
    args.config = args.config or "quickstart"
    cfg = load(args)
    env = role_env(cfg)
    start = start_options(args)
    # Before any process starts: no earlier launch still running, storage usable, and no run
    # replaced unless --force (done here, so the launch record below is not moved with it).
    check_leftovers(cfg.run_dir)
    storage = open_checked(cfg.storage_uri, create_bucket=start["create_bucket"])
    claim_run(cfg.run_dir, storage, resume=start["resume"], force=start["force"])
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous server does
        try:
            probe.bind(("127.0.0.1", env.port))
        except OSError:
            raise ConfigError("distributed.port",
                              f"port {env.port} is in use on this machine (by another run? "
                              "`ss -ltnp` shows which process); pick another with "
                              "--set distributed.port=N") from None
    plan = roles(cfg, config=args.config, overrides=child_overrides(args), addr="127.0.0.1",
                 port=env.port, run=env.run, metrics_base=env.metrics_port,
                 resume=start["resume"], allow_changed=start["allow_changed"])
    launcher = LocalLauncher(plan, grace_s=cfg.distributed.timeout_s + 10, run_dir=cfg.run_dir)
    code = launcher.run()
    saved = cfg.run_dir / "config.yaml"
    again = (f"--config {saved}" if saved.exists()
             else " ".join(["--config", args.config, *(f"--set {o}" for o in child_overrides(args))]))
    if code or launcher.interrupts:
        print(f"mtssl launch: stopped (status {code}); resume with: "
              f"mtssl launch --local {again} --resume")
    else:
        print(f"mtssl launch: all {len(plan)} roles finished; run directory: {cfg.run_dir}")
    return code
