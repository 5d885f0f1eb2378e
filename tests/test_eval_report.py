"""`mtssl report transfer`: milestones of runs with and without lasso, random-init floor,
skipping what is done, CSV/JSON, plots, alpha heatmap, the lasso table, HTML."""

import csv
import json

from synthetic import write_synthetic_nyu
from test_eval_checkpoints import save_milestones, train_tiny

from mtssl.cli import main
from mtssl.eval.report import write_report

SETS = ["--set", "imagenet.max_per_class=2", "--set", "imagenet.epochs=10",
        "--set", "nyu.iterations=2", "--set", "nyu.input_size=[24,32]"]


def test_report_end_to_end_and_rerun_skips(labelled, tmp_path, capsys):
    lasso = train_tiny(tmp_path / "lasso", steps=1)
    naive = train_tiny(tmp_path / "naive", "lasso.mode=naive", steps=1)
    save_milestones(lasso, [0.5, 1.0])
    save_milestones(naive, [0.5])
    nyu = write_synthetic_nyu(tmp_path / "nyu", train=4, test=2, size=(24, 32))
    out = tmp_path / "report"
    args = ["report", "transfer", str(tmp_path / "lasso"), str(tmp_path / "naive"),
            "--suite", f"imagenet={labelled.root}", "--suite", f"nyu={nyu}",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *SETS]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # 3 milestones + 2 eval-only-lasso variants (last of each run) + 1 random init, x 2 suites
    assert "12 evaluation(s) run, 0 reused" in printed
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 12
    hours = sorted({(r["run"], r["hours"], r["hours_kind"]) for r in records
                    if r["suite"] == "imagenet" and not r["eval_lasso"]})
    assert hours == [("lasso", 0.5, "device_hours"), ("lasso", 1.0, "device_hours"),
                     ("naive", 0.5, "device_hours"), ("random init", 0.0, "device_hours")]
    assert {r["lasso_mode"] for r in records if r["eval_lasso"]} == {"lasso", "naive"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 12 and {"top1", "top5", "delta1", "rmse"} <= set(rows[0])
    for png in ("imagenet.png", "nyu.png", "alpha_lasso.png", "alpha_naive.png"):
        assert (out / png).stat().st_size > 1000, png
    page = (out / "index.html").read_text()
    for part in ("imagenet.png", "nyu.png", "alpha_lasso.png", "Lasso table", "Eval-only lasso",
                 "Pre-train and eval lasso", "69.3", "SYNTHETIC", "results.csv"):
        assert part in page, part

    assert main(args) == 0  # everything is in results.json: nothing runs again
    assert "0 evaluation(s) run, 12 reused" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == records


def test_report_without_milestones_uses_newest_checkpoint(labelled, tmp_path):
    run = train_tiny(tmp_path / "run", steps=1)
    lines = []
    page = write_report([str(run.cfg.run_dir)], {"imagenet": labelled.root},
                        out=tmp_path / "rep", overrides={"imagenet": ["max_per_class=2",
                                                                      "epochs=5"]},
                        random_baseline=False, cache_dir=None, echo=lines.append)
    records = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [r["step"] for r in records] == [1] and records[0]["milestone"] is None
    assert records[0]["hours_kind"] == "device_hours" and records[0]["hours"] > 0
    assert "Lasso table" not in page.read_text()  # one lasso mode only
    assert lines[-1].startswith("1 evaluation(s) run")

    _, bad = save_milestones(run, [0.5, 1.0])
    corrupt = run.cfg.run_dir / bad
    corrupt.write_bytes(corrupt.read_bytes()[:-5])
    page = write_report([str(run.cfg.run_dir)], {"imagenet": labelled.root},
                        out=tmp_path / "rep2", overrides={"imagenet": ["max_per_class=2",
                                                                       "epochs=5"]},
                        random_baseline=False, cache_dir=None, echo=lines.append)
    records = json.loads((tmp_path / "rep2" / "results.json").read_text())
    assert [r["milestone"] for r in records] == ["gpuh_0000.50"]
    assert "Skipped unusable checkpoints" in page.read_text() and "corrupt" in page.read_text()
