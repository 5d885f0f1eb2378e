"""The Kubeflow pipeline's stages as plain functions.

Each component in pipelines/mtssl_pipeline.py is a thin wrapper that calls one of these inside
the mtssl image, so the stages are tested (and run by kfp.local) without a cluster. Every
stage runs the same `mtssl` commands a user would type.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys

from mtssl.eval import SUITES
from mtssl.validation import ConfigError

log = logging.getLogger(__name__)
LAUNCHERS = ("k8s", "local")


class StageError(RuntimeError):
    pass


def run_mtssl(args: list[str]) -> None:
    """`mtssl ARGS` in a child process; its output is the stage's log."""
    log.info("running: mtssl %s", " ".join(args))
    code = subprocess.call([sys.executable, "-m", "mtssl.cli", *args])
    if code:
        raise StageError(f"`mtssl {' '.join(args)}` exited with status {code}")


# --- training -------------------------------------------------------------------------------

def run_name(run: str, job_id: str) -> str:
    """The run's name: `run` if given, else one derived from the KFP pipeline run's ID, so two
    submissions of the pipeline never share objects, metrics or checkpoints."""
    return run or "kfp-" + hashlib.sha1(job_id.encode()).hexdigest()[:12]


def training_overrides(*, images: str, frames: str, tasks: list[str], budget_gpu_hours: float,
                       storage: str, run: str) -> list[str]:
    """`--set` values for the pipeline's parameters (budget 0: none; storage '': the config's).
    The config's name becomes the run's: `{name}` in output paths (the profiles' checkpoint
    prefix s3://mtssl/runs/{name}) then names this run's own place."""
    from mtssl.tasks import TASKS
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ConfigError("tasks", f"choose one or more of {list(TASKS)}, got {list(tasks)}")
    out = [f"name={run}", f"data.images={images}", f"data.frames={frames}"]
    out += [f"tasks.{t}.enabled={'true' if t in tasks else 'false'}" for t in TASKS]
    if budget_gpu_hours < 0:
        raise ConfigError("budget.gpu_hours",
                          f"must be >= 0 (0: no budget), got {budget_gpu_hours}")
    if budget_gpu_hours > 0:
        out.append(f"budget.gpu_hours={budget_gpu_hours}")
    if storage:
        out.append(f"output.storage={storage}")
    return out


def cluster_options(*, namespace: str, data_claim: str, cpu_image: str,
                    gpu_image: str) -> list[str]:
    """`mtssl launch --k8s` options for the pipeline's cluster parameters ('': the default)."""
    values = {"--namespace": namespace, "--data-claim": data_claim, "--cpu-image": cpu_image,
              "--gpu-image": gpu_image}
    return [a for flag, value in values.items() if value for a in (flag, value)]


def launch_args(*, launcher: str, config: str, overrides: list[str], profile: str,
                run: str, cluster: list[str] = ()) -> list[str]:
    """`mtssl launch` arguments: both launchers wait for the run and fail if it fails."""
    if launcher not in LAUNCHERS:
        raise ConfigError("launcher", f"must be one of {LAUNCHERS}, got {launcher!r}")
    args = ["launch", f"--{launcher}", "--config", config]
    args += [a for o in overrides for a in ("--set", o)]
    if launcher == "k8s":
        args += ["--profile", profile, "--run", run, *cluster]
    else:
        args.append("--resume")  # a retried stage continues the run instead of restarting it
    return args


def cleanup_args(*, launcher: str, config: str, overrides: list[str], profile: str, run: str,
                 cluster: list[str]) -> list[str] | None:
    """`mtssl launch --k8s --cleanup` for the pipeline's exit handler: deletes the run's
    TrainJob (its pods with it), runtime and ConfigMap, whether the pipeline succeeded, failed
    or was stopped; checkpoints stay in storage. None: a local run leaves nothing behind."""
    if launcher != "k8s":
        return None
    return launch_args(launcher=launcher, config=config, overrides=overrides, profile=profile,
                       run=run, cluster=cluster) + ["--cleanup"]


def run_config(*, launcher: str, config: str, overrides: list[str], profile: str):
    """The config the launched run uses (on Kubernetes: with its profile's overrides)."""
    if launcher == "k8s":
        from mtssl.k8s.profiles import run_spec
        return run_spec(profile, config=config, overrides=tuple(overrides)).config
    import mtssl.tasks  # noqa: F401  registers the tasks whose sections the config holds
    from mtssl.config import load_config
    return load_config(config, overrides)


def checkpoints_to_evaluate(cfg) -> list[dict]:
    """The run's milestone checkpoints (or, with none, its latest), oldest first:
    {'key': storage key, 'milestone': name, 'step': int}."""
    from mtssl.checkpoint import CheckpointStore
    from mtssl.storage import open_storage
    store = CheckpointStore(open_storage(cfg.storage_uri), keep_last=cfg.output.keep_last)
    entries = store.milestones() or store.list_checkpoints()[-1:]
    if not entries:
        raise StageError(f"no checkpoint under {cfg.storage_uri}: did the run save any?")
    return [{"key": e["key"], "milestone": e["milestone"] or f"step_{e['step']}",
             "step": e["step"]} for e in entries]


def training_summary(cfg) -> dict[str, float]:
    """Steps and device-hours (total and per task) of the run's latest checkpoint."""
    from mtssl.checkpoint import CheckpointStore
    from mtssl.storage import open_storage
    found = CheckpointStore(open_storage(cfg.storage_uri)).load_latest()
    if found is None:
        raise StageError(f"no checkpoint under {cfg.storage_uri}")
    state, step = found
    hours = {t: s / 3600 for t, s in (state.get("device_seconds") or {}).items()}
    return {"steps": float(step), "gpu_hours": sum(hours.values()),
            **{f"gpu_hours_{t}": h for t, h in sorted(hours.items())}}


# --- evaluation and report --------------------------------------------------------------------

RANDOM = "random"  # plan item: the random-init baseline of the run's trunk
NOTHING = "none"  # the plan when no suite is chosen: kfp.local cannot collect an empty loop


def plan_items(cfg, *, random_baseline: bool) -> list[dict]:
    """What each suite evaluates: the milestones (see checkpoints_to_evaluate), then optionally
    the random-init baseline. Items are {'storage', 'key', 'milestone', 'step'}."""
    items = [dict(c, storage=cfg.storage_uri) for c in checkpoints_to_evaluate(cfg)]
    if random_baseline:
        import json

        from mtssl.config import to_dict
        # as text: KFP passes dicts as protobuf Structs, whose numbers all come back as floats
        items.append({"storage": cfg.storage_uri, "key": RANDOM, "milestone": "random init",
                      "step": 0, "arch": json.dumps(to_dict(cfg.trunk))})
    return items


def plan_evaluations(items: list[dict], eval_sets: list[str], data: dict[str, str]
                     ) -> list[dict]:
    """One evaluation per chosen suite and item: the item plus 'suite' and its 'data'."""
    unknown = sorted(set(eval_sets) - set(SUITES))
    if unknown:
        raise ConfigError("eval_sets", f"unknown suites {unknown}; known: {list(SUITES)}")
    plan = [dict(item, suite=s, data=data[s])
            for s in SUITES if s in eval_sets for item in items]
    return plan or [{"suite": NOTHING, "milestone": NOTHING}]


def evaluate(*, item: dict, settings: str, out_dir: str) -> dict:
    """A plan item's suite on its checkpoint, saved as an `mtssl report transfer` results.json in
    `out_dir`, so the report stage reuses it instead of evaluating again. Returns the metrics."""
    from pathlib import Path

    from mtssl.checkpoint import CheckpointStore
    from mtssl.config import TrunkConfig, build
    from mtssl.eval.common import random_trunk, suite_settings
    from mtssl.eval.report import Evaluator
    from mtssl.storage import open_storage
    from mtssl.train import resolve_device
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    suite = item["suite"]
    if suite == NOTHING:
        return {}
    chosen = {suite: (settings, suite_settings(suite, settings))}
    ev = Evaluator(Path(out_dir), {suite: Path(item["data"])}, device=resolve_device("auto"),
                   cache_dir=None)
    if item["key"] == RANDOM:
        import json
        arch = build(TrunkConfig, json.loads(item["arch"]), "trunk")
        ev.evaluate(random_trunk(arch), "random init", chosen, [suite])
    else:
        store = CheckpointStore(open_storage(item["storage"]))
        entry = next((e for e in store.list_checkpoints() if e["key"] == item["key"]), None)
        if entry is None:
            raise StageError(f"checkpoint {item['key']} is gone from {item['storage']}")
        ev.checkpoint("run", store, entry, chosen)
    return ev.results[-1]["metrics"]


def report(*, storage: str, suites: dict[str, str], settings: str, results_dirs: list[str],
           out_dir: str, random_baseline: bool):
    """`mtssl report transfer` of the run into `out_dir`, after merging the evaluation stages' results
    so that it evaluates nothing twice. Returns index.html's path (None without suites)."""
    from pathlib import Path

    from mtssl.eval.report import read_results, record_key, save_results, write_report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged, seen = [], set()
    for d in results_dirs:
        for record in read_results(Path(d)):
            if record_key(record) not in seen:
                seen.add(record_key(record))
                merged.append(record)
    save_results(out, merged)
    if not suites:
        return None
    return write_report([storage], suites, out=out, settings_name=settings,
                        random_baseline=random_baseline, echo=log.info)


def result_metrics(out_dir: str) -> dict[str, float]:
    """'suite/milestone/metric' -> value of every result in the report's results.json."""
    from pathlib import Path

    from mtssl.eval.report import read_results
    return {f"{r['suite']}/{r['milestone'] or r['label']}/{k}": float(v)
            for r in read_results(Path(out_dir)) for k, v in r["metrics"].items()}


def inline_images(page: str, folder) -> str:
    """The report page with its PNGs as data: URIs (the KFP UI shows one file, no folder)."""
    import base64
    import re
    from pathlib import Path

    def data_uri(m):
        path = Path(folder) / m.group(3)
        if not path.is_file():
            return m.group(0)
        return f'{m.group(1)}"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
    return re.sub(r"""(<img[^>]*?src=)(["'])([^"':]+\.png)\2""", data_uri, page)


def markdown_summary(summary: dict[str, float], metrics: dict[str, float]) -> str:
    lines = ["# mtssl run", "", "| training | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(summary.items())]
    if metrics:
        lines += ["", "| evaluation (suite / checkpoint / metric) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"
