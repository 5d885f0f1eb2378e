"""`mtssl launch`: start a distributed run, as local processes (--local) or on Kubernetes (--k8s).

The Kubernetes options and their handler are in `mtssl.cli.k8s`; heavy imports in handlers.
"""

from __future__ import annotations

import argparse

from mtssl.cli.common import add_config_args, add_out_arg, add_start_args, load, overrides, start_options
from mtssl.cli.k8s import K8S_EPILOG, add_k8s_arguments, run_k8s

LAUNCH_EPILOG = """examples:
  mtssl launch --local --config quickstart --set tasks.colorization.workers=2
  mtssl launch --local --config runs/quickstart/config.yaml --resume
the same roles by hand (or in pods), with MTSSL_COORDINATOR_ADDR/PORT pointing at the coordinator:
  mtssl coordinator --config quickstart
  MTSSL_TASK=colorization MTSSL_WORKER_INDEX=0 mtssl worker --config quickstart
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="start a distributed run (coordinator + workers)",
                       epilog=LAUNCH_EPILOG + K8S_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Start the coordinator and tasks.<t>.workers workers per task: "
                                   "as local processes (--local) with the commands and variables "
                                   "their pods get, or on Kubernetes (--k8s).")
    # No default config: --k8s takes its profile's unless --config replaces it.
    add_config_args(p, None)
    add_out_arg(p)
    p.add_argument("--local", action="store_true",
                   help="as processes on this machine (config default: quickstart)")
    add_start_args(p)
    add_k8s_arguments(p)
    p.set_defaults(func=cmd_launch)


def cmd_launch(args) -> int:
    import socket

    from mtssl.config import ConfigError
    from mtssl.distributed.launch import LocalLauncher, check_leftovers, roles
    from mtssl.env import role_env
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
    plan = roles(cfg, config=args.config, overrides=overrides(args), addr="127.0.0.1",
                 port=env.port, run=env.run, metrics_base=env.metrics_port,
                 resume=start["resume"], allow_changed=start["allow_changed"])
    launcher = LocalLauncher(plan, grace_s=cfg.distributed.timeout_s + 10, run_dir=cfg.run_dir)
    code = launcher.run()
    saved = cfg.run_dir / "config.yaml"
    again = (f"--config {saved}" if saved.exists()
             else " ".join(["--config", args.config, *(f"--set {o}" for o in overrides(args))]))
    if code or launcher.interrupts:
        print(f"mtssl launch: stopped (status {code}); resume with: "
              f"mtssl launch --local {again} --resume")
    else:
        print(f"mtssl launch: all {len(plan)} roles finished; run directory: {cfg.run_dir}")
    return code
