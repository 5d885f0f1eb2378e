"""The mtssl Kubeflow pipeline (KFP v2): dataset prep (input partitions in parallel pods, then a
merge) -> training (launched and followed) -> evaluation of every milestone checkpoint on
ImageNet-style, PASCAL VOC and NYU depth suites -> a report published as KFP metrics, HTML and
Markdown.

Every component runs in one of the mtssl images (images/: the slim CPU one, the CUDA one for
GPU evaluation) and calls one function of mtssl.k8s.stages; compile with
`python pipelines/compile.py`, run locally with `python pipelines/run_local.py` (see
pipelines/README.md). Needs a KFP backend >= MIN_KFP_BACKEND.
"""

import os
from typing import List, NamedTuple

from kfp import dsl, kubernetes

from mtssl.k8s import CPU_IMAGE, GPU_IMAGE, S3_SECRET, builders
from mtssl.tasks import TASKS

# The IR uses optional secretAsEnv keys and dsl.Collected over artifacts, which KFP backends
# before 2.15 (Kubeflow 1.10 ships 2.5) reject or mis-run.
MIN_KFP_BACKEND = "2.15.0"
# The steps' own images are fixed at compile time (KFP takes a component's image from the IR):
# MTSSL_CPU_IMAGE / MTSSL_GPU_IMAGE=... to retag. The training pods' images are parameters.
STEP_CPU_IMAGE = os.environ.get("MTSSL_CPU_IMAGE", CPU_IMAGE)
STEP_GPU_IMAGE = os.environ.get("MTSSL_GPU_IMAGE", GPU_IMAGE)
# GPUs per evaluation pod, also fixed at compile time (kfp.local cannot resolve resource
# settings given as pipeline parameters): MTSSL_EVAL_GPUS=0 for a cluster without GPUs.
EVAL_GPUS = int(os.environ.get("MTSSL_EVAL_GPUS", "1"))
# Secret key -> variable: the training pods' map (mtssl.env owns the names).
S3_REQUIRED = {k: v for k, v in builders.S3_SECRET_KEYS.items() if k not in builders.S3_OPTIONAL}
S3_OPTIONAL = {k: v for k, v in builders.S3_SECRET_KEYS.items() if k in builders.S3_OPTIONAL}
ALL_TASKS = list(TASKS)  # the built-in tasks (registered on import), fixed in the IR at compile
# kfp is installed in the images (the `pipeline` extra); no pip install at run time.
component = dsl.component(base_image=STEP_CPU_IMAGE, install_kfp_package=False)
gpu_component = dsl.component(base_image=STEP_GPU_IMAGE if EVAL_GPUS else STEP_CPU_IMAGE,
                              install_kfp_package=False)


@component
def plan_prep(data: str, prepared: str, partitions: int) -> List[str]:
    """`K/N` per partition of `data` to prepare (one item, 'none', when nothing is to do)."""
    from mtssl.prep.stages import plan_partitions
    return plan_partitions(data=data, prepared=prepared, partitions=partitions)


@component
def prepare_partition(data: str, prepared: str, partition: str):
    """`mtssl prep DATA PREPARED --partition K/N` on every CPU of the pod."""
    from mtssl.prep.stages import prepare_partition as run
    run(data=data, prepared=prepared, partition=partition)


@component
def merge_prep(data: str, prepared: str) -> NamedTuple("Data", images=str, frames=str):
    """`mtssl prep-merge PREPARED`: the partitions' shards under one manifest."""
    from mtssl.prep.stages import merge_partitions
    images, frames = merge_partitions(data=data, prepared=prepared)
    return NamedTuple("Data", images=str, frames=str)(images, frames)


@component
def train(config: str, overrides: List[str], images: str, frames: str, tasks: List[str],
          budget_gpu_hours: float, storage: str, launcher: str, profile: str, run: str,
          job_id: str, namespace: str, data_pvc: str, cpu_image: str, gpu_image: str,
          random_baseline: bool, summary: dsl.Output[dsl.Metrics]
          ) -> NamedTuple("Trained", items=List[dict], storage=str):
    """Launch the run and wait for it; returns what to evaluate (milestones, random init)
    and where the run's checkpoints are."""
    from mtssl.k8s import stages
    run = stages.run_name(run, job_id)
    overrides = list(overrides) + stages.training_overrides(
        images=images, frames=frames, tasks=tasks, budget_gpu_hours=budget_gpu_hours,
        storage=storage, run=run)
    cluster = stages.cluster_options(namespace=namespace, data_claim=data_pvc,
                                     cpu_image=cpu_image, gpu_image=gpu_image)
    stages.run_mtssl(stages.launch_args(launcher=launcher, config=config, overrides=overrides,
                                        profile=profile, run=run, cluster=cluster))
    cfg = stages.run_config(launcher=launcher, config=config, overrides=overrides,
                            profile=profile)
    for name, value in stages.training_summary(cfg).items():
        summary.log_metric(name, value)
    return NamedTuple("Trained", items=List[dict], storage=str)(
        stages.plan_items(cfg, random_baseline=random_baseline), cfg.storage_uri)


@component
def plan(items: List[dict], eval_sets: List[str], imagenet_data: str, pascal_data: str,
         nyu_data: str) -> List[dict]:
    """One evaluation per chosen suite and checkpoint (each item names its suite and data)."""
    from mtssl.k8s.stages import plan_evaluations
    return plan_evaluations(items, eval_sets, {"imagenet": imagenet_data,
                                               "pascal": pascal_data, "nyu": nyu_data})


@component
def cleanup(config: str, overrides: List[str], launcher: str, profile: str, run: str,
            job_id: str, namespace: str):
    """The exit handler: delete what the train stage launched (finished, failed or stopped)."""
    from mtssl.k8s import stages
    args = stages.cleanup_args(launcher=launcher, config=config, overrides=list(overrides),
                               profile=profile, run=stages.run_name(run, job_id),
                               cluster=stages.cluster_options(namespace=namespace, data_claim="",
                                                              cpu_image="", gpu_image=""))
    if args:
        stages.run_mtssl(args)


@gpu_component
def evaluate(item: dict, settings: str, results: dsl.Output[dsl.Artifact],
             metrics: dsl.Output[dsl.Metrics]):
    """One suite on one checkpoint: linear probe (imagenet: top-1/top-5), Faster R-CNN C4
    (pascal: mAP) or the depth decoder (nyu: delta < 1.25, ...); `results` is an
    `mtssl report transfer` results folder the report stage reuses."""
    from mtssl.k8s.stages import evaluate as run
    for key, value in run(item=item, settings=settings, out_dir=results.path).items():
        metrics.log_metric(f"{item['suite']}/{item['milestone']}/{key}", value)


@component
def report(storage: str, eval_sets: List[str], imagenet_data: str, pascal_data: str,
           nyu_data: str, settings: str, random_baseline: bool,
           results: List[dsl.Artifact], summary: dsl.Input[dsl.Metrics],
           metrics: dsl.Output[dsl.Metrics], page: dsl.Output[dsl.HTML],
           markdown: dsl.Output[dsl.Markdown]):
    """The run's transfer report: metrics per suite and checkpoint, plots vs GPU-hours."""
    from pathlib import Path

    from mtssl.k8s import stages
    data = {"imagenet": imagenet_data, "pascal": pascal_data, "nyu": nyu_data}
    out = Path(page.path).parent / "report"
    index = stages.report(storage=storage, suites={s: data[s] for s in eval_sets},
                          settings=settings, out_dir=str(out), random_baseline=random_baseline,
                          results_dirs=[a.path for a in results])
    values = stages.result_metrics(str(out))
    for key, value in values.items():
        metrics.log_metric(key, value)
    Path(page.path).write_text(stages.inline_images(index.read_text(), out) if index
                               else "<p>No evaluation suites were chosen.</p>")
    Path(markdown.path).write_text(stages.markdown_summary(summary.metadata, values))


def _s3(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_REQUIRED)
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_OPTIONAL,
                                 optional=True)
    return task


def _data(task: dsl.PipelineTask, claim) -> dsl.PipelineTask:
    """The data volume at /data (kfp-kubernetes cannot mount it read-only: give the claim
    ReadOnlyMany, or trust the steps, which only read it)."""
    return kubernetes.mount_pvc(task, pvc_name=claim, mount_path=builders.DATA_DIR)


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    if EVAL_GPUS:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(EVAL_GPUS)
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists",
                                  effect="NoSchedule")
    return _s3(task)


@dsl.pipeline(name="mtssl", description="Multi-task self-supervised pre-training (Doersch & "
              "Zisserman 2017) and its transfer evaluation against GPU-hours. Needs KFP "
              f"backend >= {MIN_KFP_BACKEND} (Kubeflow 1.11).")
def mtssl_pipeline(
        config: str = "quickstart",
        overrides: List[str] = [],
        data: str = "embedded",
        prepared: str = "s3://mtssl/prepared/default",
        prep_partitions: int = 4,
        tasks: List[str] = ALL_TASKS,
        budget_gpu_hours: float = 0.0,
        storage: str = "",
        launcher: str = "k8s",
        profile: str = "cpu-small",
        run: str = "",
        namespace: str = "",
        data_pvc: str = "mtssl-data",
        cpu_image: str = CPU_IMAGE,
        gpu_image: str = GPU_IMAGE,
        eval_sets: List[str] = ["imagenet", "pascal", "nyu"],
        imagenet_data: str = "/data/imagenet",
        pascal_data: str = "/data/VOCdevkit/VOC2007",
        nyu_data: str = "/data/nyu",
        eval_settings: str = "smoke",
        random_baseline: bool = True):
    """config: built-in name or YAML path in the image; overrides: extra `--set` values;
    data: 'embedded' or a folder/URI to prepare into `prepared`; prep_partitions: pods that
    prepare it, each a share of the input, before one merge; budget_gpu_hours: 0 keeps
    the config's; storage: '' keeps the config's (on Kubernetes the profile's
    s3://mtssl/runs/{name}, {name} being the run); launcher: k8s (a cluster) or local
    (kfp.local runs only); run: '' names the run after this pipeline run's ID; namespace: ''
    is the step's own; data_pvc: claim mounted at /data in the data-reading steps and the
    training pods; cpu_image/gpu_image: the training pods' images."""
    job_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    cleaned = cleanup(config=config, overrides=overrides, launcher=launcher, profile=profile,
                      run=run, job_id=job_id, namespace=namespace)
    cleaned.set_caching_options(False)
    with dsl.ExitHandler(cleaned, name="run"):
        parts = plan_prep(data=data, prepared=prepared, partitions=prep_partitions)
        _data(_s3(parts), data_pvc)
        # Plan and merge look at what is in storage now: a cached answer could be stale.
        parts.set_caching_options(False)
        with dsl.ParallelFor(parts.output) as partition:
            part = _data(_s3(prepare_partition(data=data, prepared=prepared,
                                               partition=partition)), data_pvc)
            # The CPU limit is what `mtssl prep` counts as its cores (one worker process each);
            # motion masks are CPU-bound, memory is a few hundred MiB per worker.
            part.set_cpu_request("4").set_cpu_limit("4")
            part.set_memory_request("4Gi").set_memory_limit("8Gi")
            part.set_caching_options(False)  # resumes an interrupted partition, else no-op
        prep = _data(_s3(merge_prep(data=data, prepared=prepared)), data_pvc).after(part)
        prep.set_cpu_request("1").set_memory_request("1Gi").set_memory_limit("2Gi")
        prep.set_caching_options(False)

        trained = _s3(train(config=config, overrides=overrides, images=prep.outputs["images"],
                            frames=prep.outputs["frames"], tasks=tasks,
                            budget_gpu_hours=budget_gpu_hours, storage=storage,
                            launcher=launcher, profile=profile, run=run, job_id=job_id,
                            namespace=namespace, data_pvc=data_pvc, cpu_image=cpu_image,
                            gpu_image=gpu_image, random_baseline=random_baseline))
        # The launcher only talks to the API server; the run's own pods do the training.
        trained.set_cpu_request("500m").set_memory_request("1Gi").set_memory_limit("2Gi")
        trained.set_caching_options(False)  # always follow the run: it may have been resumed
        kubernetes.set_timeout(trained, 30 * 24 * 3600)

        planned = plan(items=trained.outputs["items"], eval_sets=eval_sets,
                       imagenet_data=imagenet_data, pascal_data=pascal_data, nyu_data=nyu_data)
        # One task definition for all suites, sized for the largest (PASCAL fine-tuning).
        with dsl.ParallelFor(planned.output, parallelism=4) as item:
            evaluated = _data(_resources(evaluate(item=item, settings=eval_settings), "8",
                                         "32Gi"), data_pvc)

        published = _data(_s3(report(storage=trained.outputs["storage"], eval_sets=eval_sets,
                                     imagenet_data=imagenet_data, pascal_data=pascal_data,
                                     nyu_data=nyu_data, settings=eval_settings,
                                     random_baseline=random_baseline,
                                     summary=trained.outputs["summary"],
                                     results=dsl.Collected(evaluated.outputs["results"]))),
                          data_pvc)
        published.set_cpu_request("4").set_memory_request("16Gi").set_memory_limit("16Gi")
