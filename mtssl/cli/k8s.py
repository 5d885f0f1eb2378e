"""`mtssl launch --k8s`: the Kubernetes options of the launch command and their handler.

`mtssl.cli.launch` defines `launch`; it adds these options with `add_k8s_arguments` and hands
`--k8s` to `run_k8s`. Imports here stay light: `mtssl --help` builds this parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
K8S_EPILOG = """Kubernetes examples:
  mtssl launch --k8s                                     # profile cpu-small: the quickstart
  mtssl launch --k8s --api pytorchjob                    # on Training Operator v1 instead
  mtssl launch --k8s --profile gpu-paper                 # paper config, 4 GPUs per task
  mtssl launch --k8s --attach                            # follow a run launched before
  mtssl launch --k8s --cancel                            # stop it (checkpoints stay)
  mtssl launch --k8s --cleanup                           # delete all of its objects
Launching a run that exists resumes it (from its latest checkpoint) instead of duplicating it.
"""


def add_k8s_arguments(p: argparse.ArgumentParser) -> None:
    from mtssl.k8s import APIS, CPU_IMAGE, GPU_IMAGE, S3_SECRET, TRAINJOB
    g = p.add_argument_group("Kubernetes (--k8s)")
    g.add_argument("--k8s", action="store_true",
                   help="run the coordinator and every task's workers on a cluster")
    g.add_argument("--api", choices=APIS, default=TRAINJOB,
                   help="trainjob (default): a TrainJob + TrainingRuntime of Kubeflow Trainer "
                        "v2; pytorchjob: a Job + one PyTorchJob per task (Training Operator v1)")
    g.add_argument("--profile", default="cpu-small",
                   help="cluster settings and config, as in manifests/overlays/<profile>: "
                        "cpu-small (default) or gpu-paper; --config replaces the config")
    g.add_argument("--namespace", help="default: the kube context's namespace, else 'mtssl'")
    g.add_argument("--context", help="kubeconfig context (default: current; in a pod: its own)")
    g.add_argument("--run", help="run name for object names and metrics (default: config name)")
    g.add_argument("--cpu-image", default=CPU_IMAGE,
                   help=f"image of the coordinator and CPU workers (default: {CPU_IMAGE})")
    g.add_argument("--gpu-image", default=GPU_IMAGE,
                   help=f"image of GPU workers (default: {GPU_IMAGE})")
    g.add_argument("--queue", help="Kueue LocalQueue admitting the TrainJob as one workload")
    g.add_argument("--s3-secret", default=S3_SECRET,
                   help="Secret with keys endpoint, access-key, secret-key[, secure, region]")
    g.add_argument("--data-claim", help="PersistentVolumeClaim mounted read-only at /data")
    action = g.add_mutually_exclusive_group()
    action.add_argument("--detach", action="store_true", help="create (or resume) and return")
    action.add_argument("--attach", action="store_true", help="only follow an existing run")
    action.add_argument("--cancel", action="store_true",
                        help="stop the run's coordinator and workers; a later launch resumes")
    action.add_argument("--cleanup", action="store_true",
                        help="delete every object of the run (checkpoints stay in storage)")
    g.add_argument("--poll-s", type=float, default=10.0, help="status poll interval (s)")
    g.add_argument("--timeout-s", type=float, help="give up following after this long")


def default_namespace(context: str | None) -> str:
    if not context and SA_NAMESPACE_FILE.is_file():
        return SA_NAMESPACE_FILE.read_text().strip()
    from kubernetes import config
    try:
        contexts, active = config.list_kube_config_contexts(os.environ.get("KUBECONFIG"))
    except (config.ConfigException, OSError):
        return "mtssl"
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "mtssl"


def kube_api_client(context: str | None):
    from kubernetes import client, config

    from mtssl.k8s.launcher import LaunchError
    try:
        if not context and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            # KUBECONFIG read now: the client reads it once, when first imported
            config.load_kube_config(os.environ.get("KUBECONFIG"), context=context)
    except (config.ConfigException, OSError) as err:
        raise LaunchError(f"no Kubernetes credentials ({err}); set KUBECONFIG or --context")
    return client.ApiClient()


def run_k8s(args: argparse.Namespace) -> int:
    from mtssl.k8s.launcher import Launcher, LaunchError
    from mtssl.k8s.profiles import run_spec
    from mtssl.validation import ConfigError
    if getattr(args, "out", None):
        raise ConfigError("output.dir", "--out is for --local; on Kubernetes logs go to the "
                                        "pod's /scratch and checkpoints to output.storage")
    fields = {"namespace": args.namespace or default_namespace(args.context), "api": args.api,
              "cpu_image": args.cpu_image, "gpu_image": args.gpu_image,
              "s3_secret": args.s3_secret, "queue": args.queue}
    if args.data_claim:
        fields["data_claim"] = args.data_claim
    spec = run_spec(args.profile, config=args.config, overrides=tuple(args.overrides),
                    run=args.run, **fields)
    try:
        launcher = Launcher(spec, api_client=kube_api_client(args.context), poll_s=args.poll_s)
        if args.cancel or args.cleanup:
            deleted = launcher.cancel() if args.cancel else launcher.cleanup()
            print("deleted: " + (", ".join(deleted) or "nothing (no such objects)"))
            return 0
        if not args.attach and launcher.submit() == "finished":
            return 0
        if args.detach:
            print(f"follow with: mtssl launch --k8s --attach --run {spec.run} "
                  f"--namespace {spec.namespace}")
            return 0
        launcher.watch(timeout_s=args.timeout_s)
        print(f"run '{spec.run}' succeeded; checkpoints in {spec.config.storage_uri}")
        return 0
    except LaunchError as err:
        print(f"mtssl: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nmtssl: detached; run '{spec.run}' keeps going. Follow it with --attach, "
              f"stop it with --cancel", file=sys.stderr)
        return 130
