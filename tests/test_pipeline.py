"""The Kubeflow pipeline: committed IR in sync, its parameters, resources and secrets, the stage
functions, and a real local run with kfp.local (local launcher, embedded data, ten labelled
classes: synthetic, and real caltech10)."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest
import yaml

from mtssl.checkpoint import CheckpointStore
from mtssl.config import load_config
from mtssl.k8s import CPU_IMAGE, GPU_IMAGE, S3_SECRET, builders, stages
from mtssl.storage import open_storage
from mtssl.tasks import TASKS
from mtssl.validation import ConfigError

pytest.importorskip("kfp", reason="the pipeline extra is not installed (pip install '.[pipeline]')")

ROOT = Path(__file__).resolve().parents[1]
IR = ROOT / "pipelines" / "mtssl_pipeline.yaml"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> dict:
    """The IR compiled now from pipelines/mtssl_pipeline.py (what the committed one must equal:
    test_committed_ir_equals_a_fresh_compile), so the checks below read the pipeline's source."""
    fresh = tmp_path_factory.mktemp("ir") / "mtssl_pipeline.yaml"
    load_script("compile").compile_to(fresh)
    docs = list(yaml.safe_load_all(fresh.read_text()))
    return {"pipeline": docs[0], "platform": docs[1] if len(docs) > 1 else {}}


# --- compiled IR ----------------------------------------------------------------------------

def test_committed_ir_equals_a_fresh_compile():
    assert load_script("compile").main(["--check"]) == 0


def test_ir_check_notices_a_change(tmp_path):
    compile_mod = load_script("compile")
    fresh = tmp_path / "fresh.yaml"
    compile_mod.compile_to(fresh)
    assert compile_mod.comparable(fresh) == compile_mod.comparable(IR)
    changed = tmp_path / "changed.yaml"
    changed.write_text(fresh.read_text().replace("defaultValue: quickstart",
                                                 "defaultValue: paper", 1))
    assert compile_mod.comparable(changed) != compile_mod.comparable(IR)


def test_ui_parameters(ir):
    params = ir["pipeline"]["root"]["inputDefinitions"]["parameters"]
    for name in ("config", "data", "prep_partitions", "budget_gpu_hours", "tasks", "eval_sets",
                 "imagenet_data", "pascal_data", "nyu_data", "overrides", "storage", "launcher", "run",
                 "namespace", "data_pvc", "cpu_image", "gpu_image"):
        assert name in params, name
    assert params["run"]["defaultValue"] == ""  # named after the pipeline run's ID
    assert params["cpu_image"]["defaultValue"] == CPU_IMAGE
    assert params["gpu_image"]["defaultValue"] == GPU_IMAGE
    assert params["tasks"]["defaultValue"] == list(TASKS)  # the pipeline's ALL_TASKS: the registry
    assert params["eval_sets"]["defaultValue"] == ["imagenet", "pascal", "nyu"]
    assert params["launcher"]["defaultValue"] == "k8s"
    assert params["prep_partitions"]["defaultValue"] == 4


def test_stages_run_in_the_image_with_resources_and_secrets(ir):
    executors = ir["pipeline"]["deploymentSpec"]["executors"]
    # the CUDA image only where a GPU is used; the slim CPU one everywhere else
    assert {n: e["container"]["image"] for n, e in executors.items()} == {
        "exec-evaluate": GPU_IMAGE, **{f"exec-{n}": CPU_IMAGE for n in (
            "plan-prep", "prepare-partition", "merge-prep", "train", "plan", "report",
            "cleanup")}}
    # no pip install at run time: kfp comes with the image
    assert not any("pip install" in " ".join(e["container"]["command"])
                   for e in executors.values())
    evaluate = executors["exec-evaluate"]["container"]["resources"]
    assert evaluate["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert evaluate["accelerator"]["resourceCount"] == "1"
    assert executors["exec-train"]["container"]["resources"]["resourceMemoryLimit"] == "2Gi"
    # `mtssl prep` runs one worker per CPU of its limit
    part = executors["exec-prepare-partition"]["container"]["resources"]
    assert part["resourceCpuLimit"] == part["resourceCpuRequest"] == "4"
    platform = ir["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-plan-prep", "exec-prepare-partition", "exec-merge-prep", "exec-train",
                 "exec-evaluate", "exec-report"):
        secrets = platform[name]["secretAsEnv"]
        keys = {k["secretKey"]: k["envVar"] for s in secrets for k in s["keyToEnv"]}
        assert keys == builders.S3_SECRET_KEYS  # the training pods' map (mtssl.env owns it)
        optional = {k["secretKey"] for s in secrets if s.get("optional") for k in s["keyToEnv"]}
        assert optional == set(builders.S3_OPTIONAL)
        assert {s["secretName"] for s in secrets} == {S3_SECRET}
    assert "value" not in json.dumps(ir["platform"])  # references only, never secret values
    # every step that reads data sees the data_pvc parameter's claim at /data
    for name in ("exec-plan-prep", "exec-prepare-partition", "exec-merge-prep", "exec-evaluate",
                 "exec-report"):
        (mount,) = platform[name]["pvcMount"]
        assert mount["mountPath"] == "/data"
        assert mount["pvcNameParameter"] == {"componentInputParameter":
                                             "pipelinechannel--data_pvc"}


def test_minimum_kfp_backend_is_stated_in_the_pipeline_and_the_readme(ir):
    minimum = load_script("mtssl_pipeline").MIN_KFP_BACKEND
    assert f">= {minimum}" in ir["pipeline"]["pipelineInfo"]["description"]
    assert f"KFP backend >= {minimum}" in (ROOT / "pipelines" / "README.md").read_text()


def test_dag_order_inside_an_exit_handler_that_cleans_up(ir):
    root = ir["pipeline"]["root"]["dag"]["tasks"]
    # cleanup runs after the handler's tasks whatever their outcome (stopped runs included)
    assert root["cleanup"]["dependentTasks"] == ["exit-handler-1"]
    assert root["cleanup"]["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    tasks = ir["pipeline"]["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    # prep: one pod per planned partition, then the merge, then training
    prep_loop = next(n for n, t in tasks.items()
                     if t.get("parameterIterator", {}).get("items", {}).get("inputParameter")
                     == "pipelinechannel--plan-prep-Output")
    assert tasks[prep_loop]["dependentTasks"] == ["plan-prep"]
    assert tasks["merge-prep"]["dependentTasks"] == [prep_loop]
    assert tasks["train"]["dependentTasks"] == ["merge-prep"]
    assert tasks["plan"]["dependentTasks"] == ["train"]
    eval_loop = next(n for n, t in tasks.items()
                     if t.get("parameterIterator", {}).get("items", {}).get("inputParameter")
                     == "pipelinechannel--plan-Output")
    assert set(tasks["report"]["dependentTasks"]) >= {eval_loop, "train"}
    assert tasks["train"]["cachingOptions"] == {}
    # both take the pipeline run's ID to name the run
    for task in (root["cleanup"], tasks["train"]):
        assert task["inputs"]["parameters"]["job_id"] == {
            "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}


# --- stage functions ------------------------------------------------------------------------

def test_prep_stages_plan_prepare_and_merge_partitions(photo_pool, tmp_path):
    """The fanned-out prep as the pipeline runs it: N partition preps, one merge, then reuse."""
    from test_prep import link_photos

    from mtssl.prep import stages as prep_stages
    src, out = tmp_path / "in", str(tmp_path / "prepared")
    link_photos(photo_pool, src, 7)
    assert prep_stages.plan_partitions(data="embedded", prepared="", partitions=3) == ["none"]
    assert prep_stages.merge_partitions(data="embedded", prepared="") == ("embedded", "embedded")
    plan = prep_stages.plan_partitions(data=str(src), prepared=out, partitions=3)
    assert plan == ["1/3", "2/3", "3/3"]
    for partition in plan:
        prep_stages.prepare_partition(data=str(src), prepared=out, partition=partition)
    assert prep_stages.merge_partitions(data=str(src), prepared=out) == (out, out)
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["partitions"] == 3 and manifest["images"]["count"] == 7
    # a later pipeline run reuses the complete dataset: nothing to prepare, nothing to merge
    assert prep_stages.plan_partitions(data=str(src), prepared=out, partitions=3) == ["none"]
    prep_stages.prepare_partition(data=str(src), prepared=out, partition="none")
    with pytest.raises(ConfigError, match="prep_partitions"):
        prep_stages.plan_partitions(data=str(src), prepared=out, partitions=0)


def test_training_overrides_enable_exactly_the_chosen_tasks():
    out = stages.training_overrides(images="embedded", frames="embedded",
                                    tasks=["colorization", "exemplar"], budget_gpu_hours=2.5,
                                    storage="s3://b/runs/{name}", run="r1")
    cfg = load_config("quickstart", out)
    assert cfg.enabled_tasks() == ["colorization", "exemplar"]
    assert cfg.budget.gpu_hours == 2.5
    assert cfg.name == "r1" and cfg.storage_uri == "s3://b/runs/r1"
    no_budget = stages.training_overrides(images="x", frames="y", tasks=["exemplar"],
                                          budget_gpu_hours=0, storage="", run="r1")
    assert not any(o.startswith(("budget.", "output.")) for o in no_budget)
    with pytest.raises(ConfigError, match="tasks"):
        stages.training_overrides(images="x", frames="y", tasks=["jigsaw"],
                                  budget_gpu_hours=0, storage="", run="r1")


def test_two_pipeline_runs_get_their_own_run_and_checkpoints():
    a = stages.run_name("", "8f14e45f-ceea-467a-9af0-2c5a0c5ffb3a")
    b = stages.run_name("", "c9f0f895-fb98-4b91-9b4f-6a7a3c1f9d02")
    assert a != b and a == stages.run_name("", "8f14e45f-ceea-467a-9af0-2c5a0c5ffb3a")
    assert stages.run_name("mine", "8f14e45f") == "mine"
    from mtssl.k8s.profiles import run_spec
    specs = [run_spec("cpu-small", run=r, overrides=tuple(stages.training_overrides(
        images="embedded", frames="embedded", tasks=["exemplar"], budget_gpu_hours=0,
        storage="", run=r))) for r in (a, b)]  # a valid run name, each its own storage prefix
    assert specs[0].config.storage_uri == f"s3://mtssl/runs/{a}" != specs[1].config.storage_uri


def test_launch_args_for_both_launchers():
    cluster = stages.cluster_options(namespace="team", data_claim="mtssl-data",
                                     cpu_image="r/c:1", gpu_image="")
    assert stages.launch_args(launcher="k8s", config="paper", overrides=["a=1"],
                              profile="gpu-paper", run="p1", cluster=cluster) == [
        "launch", "--k8s", "--config", "paper", "--set", "a=1", "--profile", "gpu-paper",
        "--run", "p1", "--namespace", "team", "--data-claim", "mtssl-data", "--cpu-image",
        "r/c:1"]
    assert stages.cleanup_args(launcher="k8s", config="paper", overrides=[],
                               profile="gpu-paper", run="p1", cluster=[])[-1] == "--cleanup"
    assert stages.cleanup_args(launcher="local", config="paper", overrides=[],
                               profile="", run="p1", cluster=[]) is None
    assert stages.launch_args(launcher="local", config="quickstart", overrides=[], profile="x",
                              run="") == ["launch", "--local", "--config", "quickstart",
                                          "--resume"]
    with pytest.raises(ConfigError, match="launcher"):
        stages.launch_args(launcher="slurm", config="c", overrides=[], profile="", run="")


def test_k8s_run_config_includes_the_profile():
    cfg = stages.run_config(launcher="k8s", config="paper", overrides=["budget.gpu_hours=5"],
                            profile="gpu-paper")
    assert cfg.tasks.exemplar.workers == 4 and cfg.budget.gpu_hours == 5
    assert cfg.storage_uri == "s3://mtssl/runs/paper"


def test_milestones_and_random_init_are_planned_per_suite(tmp_path):
    cfg = load_config("quickstart", [f"output.storage={tmp_path}", "output.keep_last=1"])
    store = CheckpointStore(open_storage(str(tmp_path)), keep_last=1)
    with pytest.raises(stages.StageError, match="no checkpoint"):
        stages.checkpoints_to_evaluate(cfg)
    store.save({"step": 2, "device_seconds": {"exemplar": 36.0}}, step=2)
    assert [c["milestone"] for c in stages.checkpoints_to_evaluate(cfg)] == ["step_2"]
    store.save({"step": 5, "device_seconds": {"exemplar": 72.0}}, step=5,
               milestone="gpuh_0000.02")
    store.save({"step": 9, "device_seconds": {"exemplar": 90.0, "shared": 18.0}}, step=9)
    items = stages.plan_items(cfg, random_baseline=True)
    assert [i["milestone"] for i in items] == ["gpuh_0000.02", "random init"]
    assert json.loads(items[1]["arch"])["units"] == [1, 1, 4]
    plan = stages.plan_evaluations(items, ["nyu", "imagenet"],
                                   {"imagenet": "/i", "pascal": "/p", "nyu": "/n"})
    assert [(p["suite"], p["milestone"], p["data"]) for p in plan] == [
        ("imagenet", "gpuh_0000.02", "/i"), ("imagenet", "random init", "/i"),
        ("nyu", "gpuh_0000.02", "/n"), ("nyu", "random init", "/n")]
    assert stages.plan_evaluations(items, [], {}) == [{"suite": "none", "milestone": "none"}]
    assert stages.evaluate(item={"suite": "none"}, settings="smoke",
                           out_dir=str(tmp_path / "r")) == {}
    with pytest.raises(ConfigError, match="eval_sets"):
        stages.plan_evaluations(items, ["cifar"], {})
    summary = stages.training_summary(cfg)
    assert summary == pytest.approx({"steps": 9.0, "gpu_hours": 0.03,
                                     "gpu_hours_exemplar": 0.025, "gpu_hours_shared": 0.005})


def test_report_page_is_self_contained(tmp_path):
    (tmp_path / "imagenet.png").write_bytes(b"\x89PNG fake")
    page = stages.inline_images("<img src='imagenet.png' alt='x'><img src='gone.png'>", tmp_path)
    assert page.startswith('<img src="data:image/png;base64,iVBORyBmYWtl" alt=')
    assert "src='gone.png'" in page  # a missing file stays a plain link
    md = stages.markdown_summary({"steps": 10.0}, {"imagenet/random init/top1": 0.5})
    assert "| steps | 10 |" in md and "| imagenet/random init/top1 | 0.5000 |" in md


# --- the local run ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_local_pipeline_run_with_kfp_local(tmp_path, labelled):
    """The documented local run (pipelines/README.md), with the tests' tiny model: trains with
    the local launcher on the embedded data, evaluates on ten classes, publishes the report."""
    from conftest import TINY
    # no milestone this short: the stage falls back to the latest checkpoint
    args = ["--out", str(tmp_path), "--steps", "6", "--milestone-hours", "100",
            "--imagenet-data", str(labelled.root), "--no-random"]
    args += [a for o in TINY + [f"distributed.port={free_port()}"] for a in ("--set", o)]
    assert load_script("run_local").main(args) == 0
    (report,) = (tmp_path / "kfp").glob("mtssl-*/report")
    results = json.loads((report / "report" / "results.json").read_text())
    latest = CheckpointStore(open_storage(str(tmp_path / "storage"))).list_checkpoints()[-1]
    assert [r["step"] for r in results] == [latest["step"]] == [6]
    labels = [r["milestone"] or r["label"] for r in results]
    assert all(r["suite"] == "imagenet" and 0 <= r["metrics"]["top5"] <= 1 for r in results)
    metrics = json.loads((report / "executor_output.json").read_text())
    published = metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert set(published) == {f"imagenet/{m}/{k}" for m in labels
                              for k in ("top1", "top5", "train_top1")}
    page = (report / "page").read_text()
    assert "data:image/png;base64," in page
    assert "| steps | 6 |" in (report / "markdown").read_text()
    # the report stage reused the evaluation stages' records (timings and all) rather than
    # evaluating again
    staged = [r for f in (tmp_path / "kfp").glob("mtssl-*/for-loop-*/evaluate/results/*.json")
              for r in json.loads(f.read_text())]
    assert sorted(staged, key=json.dumps) == sorted(results, key=json.dumps)
