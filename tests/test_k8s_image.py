"""images/Dockerfile (the CPU and CUDA images), tested without a container engine: it parses,
pins its base and torch, installs the dependencies before it copies the code and then exactly
as the README says from exactly the files it copies, and runs as non-root with a read-only root
filesystem in mind."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from mtssl.k8s import CPU_IMAGE, GPU_IMAGE, builders

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dockerfile():
    parse = pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse")
    return parse.DockerfileParser(path=str(ROOT / "images" / "Dockerfile"))


def instructions(df, name: str) -> list[str]:
    return [i["value"] for i in df.structure if i["instruction"] == name]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def install_command(df) -> str:
    (cmd,) = [r for r in instructions(df, "RUN") if r.startswith("pip install '.")]
    return cmd


def test_base_image_and_torch_are_pinned(dockerfile):
    from packaging.requirements import Requirement
    (base,) = [f.split()[0] for f in instructions(dockerfile, "FROM") if ":" in f]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    deps = {Requirement(d).name: Requirement(d) for d in pyproject()["project"]["dependencies"]}
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        (pinned,) = [a.split("=", 1)[1] for a in instructions(dockerfile, "ARG")
                     if a.startswith(f"{arg}=")]  # global ARGs, before the first FROM
        assert re.fullmatch(r"\d+\.\d+\.\d+", pinned)
        assert deps[pkg].specifier.contains(pinned), f"{pkg}=={pinned} outside {deps[pkg]}"
    cpu, cuda = [r for r in instructions(dockerfile, "RUN") if "torch==" in r]
    assert all('"torch==${TORCH_VERSION}"' in r for r in (cpu, cuda))
    assert "download.pytorch.org/whl/cpu" in cpu and "--index-url" not in cuda


def test_one_dockerfile_builds_the_cpu_and_the_cuda_image_the_manifests_name(dockerfile):
    stages = [f.split() for f in instructions(dockerfile, "FROM")]
    assert [s[-1] for s in stages if "AS" in s] == ["python", "torch-cpu", "torch-cuda"]
    assert stages[-1] == ["torch-${FLAVOUR}"]
    text = (ROOT / "images" / "Dockerfile").read_text()
    for flavour, image in (("cpu", CPU_IMAGE), ("cuda", GPU_IMAGE)):
        assert f"--build-arg FLAVOUR={flavour} -t {image} ." in text


def test_dependencies_are_installed_before_the_code_is_copied(dockerfile):
    order = [(i["instruction"], i["value"]) for i in dockerfile.structure
             if i["instruction"] in ("COPY", "RUN")]
    deps = next(i for i, (k, v) in enumerate(order) if k == "RUN" and "requirements" in v)
    code = next(i for i, (k, v) in enumerate(order) if k == "COPY" and "mtssl" in v.split())
    assert order[deps - 1] == ("COPY", "pyproject.toml ./") and deps < code


def test_install_is_the_readmes_and_names_real_extras(dockerfile):
    cmd = install_command(dockerfile)
    extras = re.fullmatch(r"pip install '\.\[([\w,]+)\]'", cmd).group(1).split(",")
    assert set(extras) <= set(pyproject()["project"]["optional-dependencies"])
    assert {"s3", "k8s", "pipeline"} <= set(extras)  # checkpoints, launcher, pipeline steps
    assert cmd in (ROOT / "README.md").read_text(), f"README does not show the image's install: {cmd}"


def dockerignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.removeprefix("**/"))
               or rel.split("/")[0] == p for p in patterns)


def test_copied_files_alone_build_the_package_with_configs_and_entry_point(dockerfile, tmp_path):
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ".git" in ignore
    src = tmp_path / "src"
    src.mkdir()
    for value in instructions(dockerfile, "COPY"):
        *sources, _ = shlex.split(value)
        for s in sources:
            assert not dockerignored(s, ignore), f"{s} is copied but .dockerignore drops it"
            path = ROOT / s
            if path.is_dir():
                shutil.copytree(path, src / s, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.pyc"))
            else:
                (src / s).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, src / s)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mtssl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        entry_points = zf.read(entry).decode()
    assert "mtssl/configs/quickstart.yaml" in names and "mtssl/configs/paper.yaml" in names
    assert "mtssl/k8s/launcher.py" in names
    assert re.search(r"^mtssl = mtssl\.cli:main$", entry_points, re.M)


def test_runs_as_the_non_root_user_the_pods_expect(dockerfile):
    users = instructions(dockerfile, "USER")
    assert users, "no USER: the image would run as root"
    uid, gid = users[-1].split(":")
    assert int(uid) == builders.UID != 0 and int(gid) == builders.UID
    (useradd,) = [r for r in instructions(dockerfile, "RUN") if "useradd" in r]
    assert f"--uid {builders.UID}" in useradd and f"--gid {builders.UID}" in useradd
    # nothing after USER needs root, and the entry point is the CLI in exec form
    order = [i["instruction"] for i in dockerfile.structure if i["instruction"] != "COMMENT"]
    assert "RUN" not in order[order.index("USER"):]
    assert json.loads(instructions(dockerfile, "ENTRYPOINT")[-1]) == ["mtssl"]
    # with a read-only root filesystem, everything written goes under the pods' /tmp emptyDir
    env = dockerfile.envs
    assert all(env[k].startswith(builders.TMP_DIR) for k in (
        "HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME", "TORCH_HOME"))
    assert pyproject()["project"]["scripts"]["mtssl"] == "mtssl.cli:main"


def test_constraints_pin_every_direct_dependency_of_the_images_within_pyproject(dockerfile):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    assert any(e == "PIP_CONSTRAINT=/opt/mtssl/constraints.txt"
               for e in instructions(dockerfile, "ENV"))
    project = pyproject()["project"]
    declared = [Requirement(d) for d in project["dependencies"] + [
        d for e in ("prep", "s3", "k8s", "pipeline") for d in project["optional-dependencies"][e]]]
    wanted = {canonicalize_name(r.name): r for r in declared
              if canonicalize_name(r.name) not in ("torch", "torchvision")}
    pins = {}
    for line in (ROOT / "images" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert set(pins) == set(wanted)
    for name, version in pins.items():
        assert wanted[name].specifier.contains(version), f"{name}=={version} vs {wanted[name]}"
