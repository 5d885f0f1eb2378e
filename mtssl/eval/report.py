"""The transfer report of one or more pre-training runs (the paper's Figures 1b, 3, 4 and its
lasso table), as HTML + PNG in one folder, readable without anything else.

Every milestone checkpoint of each run (or, without milestones, its newest checkpoint) is
evaluated on the configured suites, plus a random-init trunk of each architecture. Results
accumulate in `results.json` (and `results.csv`); an evaluation whose checkpoint digest,
suite, settings and data are already there is skipped, so an interrupted report resumes.
When runs pre-trained with and without lasso are given, the last checkpoint of each is also
evaluated with eval-only lasso, filling the paper's four-row lasso table.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import numpy as np

from mtssl.checkpoint import CheckpointError
from mtssl.config import TrunkConfig, build
from mtssl.eval.common import (
    HOURS_LABELS,
    SUITES,
    EvalError,
    load_entry,
    newest_entry,
    random_trunk,
    run_store,
    run_suite,
    settings_digest,
    suite_settings,
)
from mtssl.storage import NotFound

SUITE_TITLES = {"imagenet": "ImageNet-style linear probe", "pascal": "PASCAL VOC detection",
                "nyu": "NYU depth"}
TABLE_COLUMNS = (("imagenet", "top5", "ImageNet top-5"), ("pascal", "mAP", "PASCAL mAP"),
                 ("nyu", "delta1", "NYU % < 1.25"))
LASSO_ROWS = (("naive", False, "No lasso"), ("naive", True, "Eval-only lasso"),
              ("lasso", False, "Pre-train only lasso"), ("lasso", True, "Pre-train and eval lasso"))
# The paper's lasso table (four tasks, 16.8K GPU-hours): ImageNet top-5, PASCAL mAP, NYU % < 1.25.
PAPER_LASSO = {"No lasso": (69.30, 70.53, 79.25), "Eval-only lasso": (70.18, 68.86, 79.41),
               "Pre-train only lasso": (68.09, 68.49, 78.96),
               "Pre-train and eval lasso": (69.44, 68.98, 79.45)}


def record_key(r: dict) -> tuple:
    return r["checkpoint"], r["suite"], r["settings_digest"], r["data"]


def read_results(out: Path) -> list[dict]:
    path = out / "results.json"
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvalError(f"{path} is not valid JSON ({err}); move it away to start afresh") from None


def save_results(out: Path, results: list[dict]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(out / "results.json")


class Evaluator:
    """Runs what is missing from results.json and saves after every evaluation."""

    def __init__(self, out: Path, suites: dict[str, Path], *, device, cache_dir: Path | None,
                 echo=print):
        self.out, self.suites, self.device, self.cache_dir, self.echo = out, suites, device, \
            cache_dir, echo
        self.results = read_results(out)
        self.done = {record_key(r) for r in self.results}
        self.evaluated = 0
        self.unusable: list[str] = []  # checkpoints that failed verification or decoding

    def missing(self, identity: str, settings: dict) -> list[str]:
        return [s for s in self.suites
                if (identity, s, settings_digest(settings[s][1]),
                    str(self.suites[s].resolve())) not in self.done]

    def evaluate(self, loaded, run: str, settings: dict, suites: list[str]) -> None:
        for suite in suites:
            name, s = settings[suite]
            self.echo(f"evaluating {run} / {loaded.label} on {suite} ({name})")
            record = run_suite(suite, loaded, self.suites[suite], s, settings_name=name,
                               device=self.device, cache_dir=self.cache_dir)
            record.update(run=run, eval_lasso=bool(getattr(s, "lasso", False)),
                          pretrain_alpha=None if loaded.alpha is None else loaded.alpha.tolist(),
                          tasks=list(loaded.tasks))
            self.results.append(record)
            self.done.add(record_key(record))
            self.evaluated += 1
            save_results(self.out, self.results)

    def checkpoint(self, run: str, store, entry: dict, settings: dict):
        """Evaluate one manifest entry where needed; its records (old or new) for the report."""
        identity = f"sha256:{entry['sha256']}"
        todo = self.missing(identity, settings)
        if todo:
            try:
                loaded = load_entry(store, entry)
            except (CheckpointError, NotFound) as err:
                self.unusable.append(f"{run}: {err}")
                self.echo(f"skipping unusable checkpoint: {err}")
                return []
            self.evaluate(loaded, run, settings, todo)
        digests = {settings_digest(s) for _, s in settings.values()}
        return [dict(r, run=run) for r in self.results
                if r["checkpoint"] == identity and r["settings_digest"] in digests]


def write_report(runs: list[str], suites: dict[str, str | Path], *, out: str | Path,
                 settings_name: str = "smoke", overrides: dict[str, list[str]] | None = None,
                 device=None, cache_dir: Path | None = None, random_baseline: bool = True,
                 echo=print) -> Path:
    """Evaluate what is missing, then write results.{json,csv}, PNGs and index.html into `out`."""
    import torch
    if not runs:
        raise EvalError("no run given")
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise EvalError(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    base = {s: (settings_name, suite_settings(s, settings_name, overrides.get(s, [])))
            for s in suites}
    with_lasso = {s: (settings_name, suite_settings(s, settings_name,
                                                     overrides.get(s, []) + ["lasso=true"]))
                  for s in suites}
    ev = Evaluator(out, {s: Path(p) for s, p in suites.items()},
                   device=device or torch.device("cpu"), cache_dir=cache_dir, echo=echo)
    names = run_names(runs)
    stores = {name: run_store(run) for name, run in zip(names, runs)}
    shown, last = [], {}
    for name, store in stores.items():
        entries = store.milestones() or [newest_entry(store, name)]
        for entry in entries:
            shown += ev.checkpoint(name, store, entry, base)
        last[name] = entries[-1]
    modes = {r["run"]: r["lasso_mode"] for r in shown}
    if {"naive", "lasso"} <= set(modes.values()):
        for name, store in stores.items():
            shown += [r for r in ev.checkpoint(name, store, last[name], with_lasso)
                      if r["eval_lasso"]]
    if random_baseline:
        archs = {json.dumps(r["arch_config"], sort_keys=True) for r in shown}
        for arch in sorted(archs):
            loaded = random_trunk(build(TrunkConfig, json.loads(arch), "trunk"))
            todo = ev.missing(loaded.identity, base)
            if todo:
                ev.evaluate(loaded, "random init", base, todo)
            digests = {settings_digest(s) for _, s in base.values()}
            shown += [r for r in ev.results if r["checkpoint"] == loaded.identity
                      and r["settings_digest"] in digests]
    echo(f"{ev.evaluated} evaluation(s) run, {len(shown) - ev.evaluated} reused from "
         f"{out / 'results.json'}")
    return render(shown, out, last_keys={f"sha256:{e['sha256']}" for e in last.values()},
                  unusable=ev.unusable)


def run_names(runs: list[str]) -> list[str]:
    """Short unique names: the last path component, numbered when two coincide."""
    names = []
    for run in runs:
        base = run.rstrip("/").rsplit("/", 1)[-1] or run
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


# --- rendering -------------------------------------------------------------------------------

def write_csv(records: list[dict], path: Path) -> None:
    metrics = sorted({k for r in records for k in r["metrics"]})
    head = ["run", "label", "checkpoint", "step", "milestone", "hours", "hours_kind", "suite",
            "settings", "eval_lasso", *metrics, "seconds", "skipped", "data"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in records:
            w.writerow([r.get(k) for k in head[:10]] + [r["metrics"].get(m) for m in metrics]
                       + [round(r["seconds"], 2), json.dumps(r["skipped"]), r["data"]])


def plot_suite(records: list[dict], suite: str, out: Path) -> None:
    """Each metric against pre-training hours, one line per run; random init as a flat line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in records if r["suite"] == suite and not r["eval_lasso"]]
    metrics = [m for m in rows[0]["metrics"] if m != "train_top1"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), squeeze=False)
    kinds = {r["hours_kind"] for r in rows if r["run"] != "random init"}
    xlabel = (HOURS_LABELS[kinds.pop()] if len(kinds) == 1 else
              "pre-training hours (device-hours where recorded, else wall-clock)")
    for ax, metric in zip(axes[0], metrics):
        for run in sorted({r["run"] for r in rows} - {"random init"}):
            pts = sorted((r["hours"] or 0.0, r["metrics"][metric]) for r in rows if r["run"] == run)
            ax.plot(*zip(*pts), marker="o", label=run)
        for r in (r for r in rows if r["run"] == "random init"):
            ax.axhline(r["metrics"][metric], linestyle="--", color="gray",
                       label=f"random init ({r['arch']})")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=7)
    axes[0][0].legend(fontsize=6)
    synthetic = any(r.get("synthetic") for r in rows)
    fig.suptitle(SUITE_TITLES[suite] + (" (SYNTHETIC fixtures)" if synthetic else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def alpha_rows(records: list[dict], run: str, last_keys: set[str]):
    """(matrix, row names) of a run's last checkpoint: pre-training rows, eval-only lasso rows."""
    mine = [r for r in records if r["run"] == run and r["checkpoint"] in last_keys]
    if not mine or mine[0]["pretrain_alpha"] is None:
        return None
    rows = list(mine[0]["pretrain_alpha"])
    names = list(mine[0]["tasks"])
    for r in mine:
        if r.get("alpha") is not None:
            rows.append(r["alpha"])
            names.append(f"eval: {r['suite']}")
    return np.array(rows), names


def plot_alpha_matrix(alpha: np.ndarray, rows: list[str], out: Path) -> None:
    """Signed alpha per row (pre-training tasks, then eval-only lasso heads) and block-3 unit,
    each cell annotated, so a few units stay as readable as the paper's 23."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    units = alpha.shape[1]
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 0.5 * units), 1.2 + 0.45 * len(rows)))
    bound = max(float(np.abs(alpha).max()), 1e-6)
    im = ax.imshow(alpha, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    if units <= 12:
        for (i, j), v in np.ndenumerate(alpha):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > bound / 2 else "black")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xticks(range(units), [str(u + 1) for u in range(units)], fontsize=7)
    ax.set_xlabel("block-3 unit")
    ax.set_title("lasso alpha per task / eval head and unit", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def lasso_table(records: list[dict], last_keys: set[str]) -> list[tuple[str, list]]:
    cells = []
    for mode, eval_lasso, label in LASSO_ROWS:
        row = []
        for suite, metric, _ in TABLE_COLUMNS:
            vals = [r["metrics"][metric] for r in records if r["checkpoint"] in last_keys
                    and r["lasso_mode"] == mode and r["eval_lasso"] == eval_lasso
                    and r["suite"] == suite]
            row.append(100 * vals[-1] if vals else None)
        cells.append((label, row))
    return cells


def fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def table_text(head: list[str], rows: list[list]) -> str:
    """The same table as plain text with aligned columns (what the benchmarks print)."""
    cells = [[str(c) for c in row] for row in [head, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def table_html(head: list[str], rows: list[list]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + cells + "</table>")


def render(records: list[dict], out: Path, *, last_keys: set[str], unusable: list[str]) -> Path:
    write_csv(records, out / "results.csv")
    parts = ["<h1>Transfer evaluation report</h1>",
             "<p>Each metric against pre-training compute; random initialisation is the floor "
             "(dashed). Compute is device-hours from the checkpoint's accounting: GPU-hours for "
             "runs on GPUs, while a CPU process counts as one device; checkpoints without it "
             "fall back to one process's wall-clock hours. Results: "
             "<a href='results.csv'>results.csv</a>, <a href='results.json'>results.json</a>."
             "</p>"]
    if unusable:
        parts.append("<p><b>Skipped unusable checkpoints:</b> "
                     + "; ".join(html.escape(u) for u in unusable) + "</p>")
    for suite in [s for s in SUITES if any(r["suite"] == s for r in records)]:
        plot_suite(records, suite, out / f"{suite}.png")
        rows = [r for r in records if r["suite"] == suite]
        metrics = list(rows[0]["metrics"])
        note = "".join(f"<p><b>{html.escape(r['data_note'])}</b></p>"
                       for r in rows[:1] if r.get("data_note"))
        body = [[r["run"], r["label"], r["hours"], r["hours_kind"], r["eval_lasso"],
                 *[r["metrics"].get(m) for m in metrics], json.dumps(r["skipped"]),
                 round(r["seconds"], 1)] for r in rows]
        parts += [f"<h2>{SUITE_TITLES[suite]}</h2>", note,
                  f"<img src='{suite}.png' alt='{suite} metrics vs pre-training hours'>",
                  table_html(["run", "checkpoint", "hours", "hours kind", "eval lasso", *metrics,
                              "skipped", "seconds"], body)]
        if suite == "nyu":
            parts.append(table_html(["checkpoint", "constant-depth baseline delta1",
                                     "model delta1"],
                                    [[r["label"], r["constant_baseline"]["delta1"],
                                      r["metrics"]["delta1"]] for r in rows]))
    for run in sorted({r["run"] for r in records} - {"random init"}):
        found = alpha_rows(records, run, last_keys)
        if found is not None:
            plot_alpha_matrix(*found, out / f"alpha_{run}.png")
            parts += [f"<h2>Lasso coefficients: {html.escape(run)}</h2>",
                      f"<img src='alpha_{html.escape(run)}.png' alt='alpha heatmap'>"]
    modes = {r["lasso_mode"] for r in records if r["run"] != "random init"}
    if {"naive", "lasso"} <= modes:
        rows = lasso_table(records, last_keys)
        parts += ["<h2>Lasso table (last checkpoint of each run, %)</h2>",
                  table_html(["", *[c[2] for c in TABLE_COLUMNS]], [[label, *v] for label, v in rows]),
                  "<p>The paper (four tasks, 16.8K GPU-hours; ImageNet, VOC2007, NYU v2):</p>",
                  table_html(["", *[c[2] for c in TABLE_COLUMNS]],
                             [[label, *v] for label, v in PAPER_LASSO.items()])]
    page = out / "index.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'><title>mtssl transfer "
                    "report</title><style>body{font-family:sans-serif;max-width:70em;margin:auto}"
                    "table{border-collapse:collapse;font-size:85%}td,th{border:1px solid #ccc;"
                    "padding:2px 6px}img{max-width:100%}</style></head><body>"
                    + "\n".join(p for p in parts if p) + "</body></html>")
    return page
