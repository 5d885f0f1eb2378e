"""Compile the pipeline to pipelines/mtssl_pipeline.yaml (the IR YAML users upload in the
Kubeflow UI). `--check`: compile to a temporary file and fail if the committed one differs."""

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
COMPILED = HERE / "mtssl_pipeline.yaml"


def compile_to(path: Path) -> None:
    from kfp import compiler
    sys.path.insert(0, str(HERE))
    from mtssl_pipeline import mtssl_pipeline
    compiler.Compiler().compile(mtssl_pipeline, str(path))


def comparable(path: Path) -> list:
    # The SDK stamps its own version into the IR; another patch release is not a change.
    docs = list(yaml.safe_load_all(path.read_text()))
    for doc in docs:
        doc.pop("sdkVersion", None)
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the committed IR is stale")
    args = ap.parse_args(argv)
    if not args.check:
        compile_to(COMPILED)
        print(f"wrote {COMPILED.relative_to(HERE.parent)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / COMPILED.name
        compile_to(fresh)
        if COMPILED.is_file() and comparable(fresh) == comparable(COMPILED):
            return 0
    print(f"{COMPILED.relative_to(HERE.parent)} is out of date: run python pipelines/compile.py",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
