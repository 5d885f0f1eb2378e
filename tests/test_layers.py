"""Dependencies point down (issue 10): every mtssl module imports only modules of its own layer
or of layers below it, lazy imports inside functions included (they are dependencies too);
imports under `if TYPE_CHECKING:` are types only and do not count. The README's "How it is
built" draws these layers; this table is their owner."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtssl"

# Lowest first. A module belongs to the layer of its longest matching name.
LAYERS = [
    ("foundations: config, facts, pure maths",
     ["mtssl", "mtssl.configs", "mtssl.validation", "mtssl.errors", "mtssl.env", "mtssl.config",
      "mtssl.task_sections", "mtssl.task_registry", "mtssl.accounting", "mtssl.schedules",
      "mtssl.colour", "mtssl.optim", "mtssl.precision", "mtssl.signals", "mtssl.procs",
      "mtssl.runlog", "mtssl.figures"]),
    ("storage and run directories", ["mtssl.storage", "mtssl.checkpoint", "mtssl.runlock"]),
    ("data: images, sample streams, shards", ["mtssl.data"]),
    ("model parts: trunk, lasso, heads' building blocks", ["mtssl.models"]),
    ("tasks", ["mtssl.tasks"]),
    ("assembly: the multi-task net, task data, health, metrics",
     ["mtssl.models.multitask", "mtssl.data.sources", "mtssl.preflight", "mtssl.health",
      "mtssl.metrics"]),
    ("the training loop", ["mtssl.train", "mtssl.resume"]),
    ("roles, launchers, prep, evaluation, reports",
     ["mtssl.distributed", "mtssl.k8s", "mtssl.prep", "mtssl.eval", "mtssl.pretrain_report"]),
    ("command line", ["mtssl.cli"]),
]


def layer_of(module: str) -> int:
    found = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]
    assert found, f"{module} is in no layer: add it to LAYERS"
    return max(found)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST) -> set[str]:
    """mtssl modules imported anywhere in the file except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m == "mtssl" or m.startswith("mtssl.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    me = module_name(path)
    mine = layer_of(me)
    upward = [f"{m} ({LAYERS[layer_of(m)][0]})" for m in runtime_imports(ast.parse(path.read_text()))
              if layer_of(m) > mine]
    assert not upward, f"{me} ({LAYERS[mine][0]}) imports from above: {', '.join(upward)}"


def test_the_check_sees_an_upward_import():
    tree = ast.parse("def f():\n    from mtssl.train import Trainer\n")
    assert layer_of(next(iter(runtime_imports(tree)))) > layer_of("mtssl.config")
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mtssl.train\n")
    assert runtime_imports(typed) == set()
