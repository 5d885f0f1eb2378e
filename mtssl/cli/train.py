"""`mtssl train`, `mtssl quickstart` and `mtssl config`: one process, one run."""

from __future__ import annotations

import argparse

from mtssl.cli.common import (
    add_config_args,
    add_out_arg,
    add_resume_args,
    add_set_arg,
    add_start_args,
    load,
    report_pretrain,
    start_options,
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pre-train the trunk on the enabled tasks (one process)",
                       description="Train all enabled tasks on one trunk in this process. Writes "
                                   "config.yaml, metrics.jsonl, checkpoints and a report to the "
                                   "run directory (output.dir).")
    add_config_args(p, "quickstart")
    add_out_arg(p)
    add_resume_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quickstart", help="the README's main job: tiny 4-task run + report",
                       description="Train the tiny `quickstart` config on the embedded default "
                                   "data (real photos bundled in scikit-image, synthetic motion "
                                   "clips made from them) on this machine, then write a report.")
    add_set_arg(p, example="schedule.max_steps=50")
    p.add_argument("--out", help="run directory (default runs/quickstart)")
    add_start_args(p)
    p.set_defaults(func=cmd_train, config="quickstart", no_report=False)

    p = sub.add_parser("config", help="validate a config and print it resolved",
                       description="Load a config with overrides, check every key, type and "
                                   "range, and print the resolved YAML.")
    add_config_args(p, "quickstart")
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from mtssl.config import to_dict
    print(yaml.safe_dump(to_dict(load(args)), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mtssl.signals import StopOnSignal
    from mtssl.train import Trainer
    cfg = load(args)
    hint = f"continue with: mtssl train --config {cfg.run_dir / 'config.yaml'} --resume"
    with StopOnSignal() as stop:
        trainer = Trainer(cfg, **start_options(args))
        stop.bind(trainer.request_stop)
        state = trainer.train()
    if stop.received:
        print(f"mtssl: stopped by {stop.received[0]} at step {state.step} with a final "
              f"checkpoint; run directory: {cfg.run_dir}; {hint}")
        return 0
    report_pretrain(cfg, args)
    print(f"run directory: {cfg.run_dir} (step {state.step}); {hint}")
    return 0
