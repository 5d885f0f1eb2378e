"""benchmarks/gpu_step.py runs end to end at tiny size on the CPU (rows, not timings)."""

import importlib.util
from pathlib import Path

from conftest import TINY

from mtssl.tasks import TASKS

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"


def test_gpu_step_benchmark_prints_its_table_at_tiny_size(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = [a for o in TINY for a in ("-o", o)]
    table = bench.main([*args, "-o", f"output.dir={tmp_path}", "--device", "cpu",
                        "--precision", "fp32,bf16", "--steps", "1", "--sampler-batches", "1"])
    out = capsys.readouterr().out
    assert "CPU" in out.splitlines()[0]
    assert table[0] == ["measure", "fp32", "bf16"]
    names = [row[0] for row in table[1:]]
    for want in ("project step (ms)", "tasks' own fwd+bwd alone (ms)", "bare trunk fwd+bwd (ms)",
                 "step/alone", "step/trunk", "peak memory of the step (MiB)",
                 "images/s (trunk inputs)"):
        assert want in names and want in out
    for task in TASKS:
        assert any(n.startswith(f"{task} sampler") for n in names), task
    assert all(len(row) == 3 for row in table)
