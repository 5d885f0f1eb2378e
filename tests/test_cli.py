"""The `mtssl` command's shape: one package, each subcommand defined once, one override flag."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mtssl.cli import build_parser, main
from mtssl.cli.report import upgrade_argv

CLI = Path(__file__).resolve().parents[1] / "mtssl" / "cli"


def subcommands(parser) -> dict:
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_python_m_mtssl_cli_runs():
    out = subprocess.run([sys.executable, "-m", "mtssl.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("train", "quickstart", "launch", "coordinator", "worker", "eval", "report"):
        assert f"    {name} " in out, name
    assert "report-pretrain" not in out  # the old spelling is not advertised


def test_report_has_pretrain_and_transfer():
    kinds = subcommands(subcommands(build_parser())["report"])
    assert set(kinds) == {"pretrain", "transfer"}
    args = build_parser().parse_args(["report", "pretrain", "runs/x"])
    assert args.func.__name__ == "cmd_pretrain" and args.run_dir == "runs/x"
    args = build_parser().parse_args(["report", "transfer", "runs/x", "--suite", "nyu=d",
                                      "--set", "nyu.iterations=2"])
    assert args.func.__name__ == "cmd_transfer" and args.overrides == ["nyu.iterations=2"]


@pytest.mark.parametrize("old, new", [
    (["report-pretrain", "r"], ["report", "pretrain", "r"]),
    (["report", "r", "--suite", "nyu=d"], ["report", "transfer", "r", "--suite", "nyu=d"]),
    (["report", "pretrain", "r"], ["report", "pretrain", "r"]),
    (["train"], ["train"]),
])
def test_old_report_spellings_still_work_with_one_line(old, new):
    lines = []
    assert upgrade_argv(old, lines.append) == new
    assert len(lines) == (old != new) and all("deprecated" in line for line in lines)


def test_every_command_takes_overrides_as_set():
    parser = build_parser()
    for name, sub in subcommands(parser).items():
        nested = [p for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"
                  for p in a.choices.values()]
        for p in nested or [sub]:
            flags = {f for a in p._actions for f in a.option_strings}
            assert not {"-o", "--override", "--overrides"} & flags, name
            if "--set" in flags:
                action = next(a for a in p._actions if "--set" in a.option_strings)
                assert action.dest == "overrides" and action.metavar == "KEY=VALUE", name


def test_each_subcommand_is_defined_once_and_no_module_imports_another_by_name():
    defined: dict[str, str] = {}
    for path in sorted(CLI.glob("*.py")):
        source = path.read_text()
        assert "importlib" not in source, path.name
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_parser"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                name = node.args[0].value
                assert name not in defined, f"{name} in {path.name} and {defined[name]}"
                defined[name] = path.name
    handlers = [n.name for p in CLI.glob("*.py") for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")]
    assert len(handlers) == len(set(handlers)), sorted(handlers)


def test_report_pretrain_on_a_missing_run_directory_is_one_line(capsys, tmp_path):
    missing = tmp_path / "no_such_run"
    assert main(["report", "pretrain", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"mtssl: no run directory {missing}\n"  # one line, no traceback
    assert main(["report", "pretrain", str(tmp_path)]) == 2  # a directory, but not a run's
    err = capsys.readouterr().err
    assert "Traceback" not in err and "has no config.yaml" in err and err.count("\n") == 1


def test_launch_says_where(capsys):
    assert main(["launch"]) == 2
    assert "--local" in capsys.readouterr().err
