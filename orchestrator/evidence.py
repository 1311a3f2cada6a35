"""What the claims report reads: one sweep as MLflow holds it, and the formatting its sections share.

`load_sweep` reads the parent run (spec hash, commit, data provenance), its finished trial runs (final metrics),
their reduced-SAE curves (metric histories with step = G) and their training histories (step = tokens seen).
Nothing here decides a verdict; orchestrator/claims.py does, with orchestrator/stats.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator import stats  # noqa: E402
from orchestrator.tracking import PARENT_TAG, latest_sweep_run, parse_curve_key  # noqa: E402

GRID = ["n_latents", "k", "architecture", "partition", "seed"]
TRAINING_COLUMNS = ["run_id", "metric", "step", "value"]  # train/fvu and train/prefix_fvu/<m>, step = tokens seen
PAIR = ["n_latents", "k", "architecture", "seed"]  # a Matryoshka run and a vanilla run are paired on these
CURVE_METRICS = {"fvu", "l0", "ce_score", "ce_score_lo", "ce_score_hi", "rsa", "fvu_std"}  # plus every proxy/...



@dataclass
class Sweep:
    """One sweep as MLflow holds it: the parent's params/tags, one row per finished trial, and the curve points."""

    experiment: str
    parent_id: str
    params: dict[str, str]
    tags: dict[str, str]
    runs: pd.DataFrame  # run_id, GRID columns, kind, and one column per final metric
    curves: pd.DataFrame  # run_id, metric, method, rule, G, value
    training: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TRAINING_COLUMNS))

    def final(self, key: str) -> pd.Series:
        return column(self.runs, key)


def column(df: pd.DataFrame, key: str) -> pd.Series:
    """A final-metric column, all NaN when no run logged it (a missing metric is "not measured", not a crash)."""
    return df[key].astype(float) if key in df else pd.Series(np.nan, index=df.index)


@dataclass
class Claim:
    title: str
    rule: str
    verdict: str = "not measured"
    lines: list[str] = field(default_factory=list)
    figure: str | None = None


# ---- reading -------------------------------------------------------------------------------------------------------
def latest_parent(client: MlflowClient, experiment: str) -> str:
    """The most recent FINISHED sweep run of the experiment (what the report describes by default)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"--experiment: no MLflow experiment {experiment!r} in {client.tracking_uri}")
    run = latest_sweep_run(client, [exp.experiment_id], finished=True)
    if run is None:
        raise ValueError(f"experiment {experiment!r} has no FINISHED sweep run; finish the sweep or pass --parent RUN_ID")
    return run.info.run_id


def load_sweep(client: MlflowClient, experiment: str, parent_id: str | None = None) -> Sweep:
    parent = client.get_run(parent_id or latest_parent(client, experiment))
    exp_id = parent.info.experiment_id
    if client.get_experiment(exp_id).name != experiment:
        raise ValueError(f"--parent {parent_id} belongs to experiment {client.get_experiment(exp_id).name!r}, "
                         f"not {experiment!r}; pass the matching --experiment")
    query = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and attributes.status = 'FINISHED'"
    rows, points, training = [], [], []
    for run in client.search_runs([exp_id], query, max_results=5000):
        p = run.data.params
        if not all(key in p for key in GRID):
            continue  # not a grid trial
        row = {"run_id": run.info.run_id, "n_latents": int(p["n_latents"]), "k": int(p["k"]),
               "architecture": p["architecture"], "partition": p["partition"], "seed": int(p["seed"])}
        row["kind"] = "vanilla" if row["partition"] == "none" else "matryoshka"
        row.update({key: v for key, v in run.data.metrics.items() if parse_curve_key(key) is None})
        rows.append(row)
        for key in run.data.metrics:
            if key == "train/fvu" or key.startswith("train/prefix_fvu/"):
                training += [(run.info.run_id, key, int(m.step), m.value)
                             for m in client.get_metric_history(run.info.run_id, key)]
                continue
            metric, method, rule = parse_curve_key(key) or ("", "", "")
            if metric in CURVE_METRICS or metric.startswith("proxy/"):
                points += [(run.info.run_id, metric, method, rule, int(m.step), m.value)
                           for m in client.get_metric_history(run.info.run_id, key)]
    if not rows:
        raise ValueError(f"parent run {parent.info.run_id} has no FINISHED trial runs with grid params {GRID}")
    curves = pd.DataFrame(points, columns=["run_id", "metric", "method", "rule", "G", "value"])
    return Sweep(experiment, parent.info.run_id, dict(parent.data.params), dict(parent.data.tags),
                 pd.DataFrame(rows).sort_values(GRID, ignore_index=True),
                 curves.drop_duplicates(["run_id", "metric", "method", "rule", "G"], keep="last"),
                 pd.DataFrame(training, columns=TRAINING_COLUMNS))


def curve(sweep: Sweep, metric: str, method: str, rule: str, kind: str) -> pd.DataFrame:
    """One curve of every run of a kind, with the grid columns: run_id, GRID..., G, value."""
    c = sweep.curves
    sel = c[(c.metric == metric) & (c.method == method) & (c.rule == rule)][["run_id", "G", "value"]]
    return sweep.runs[sweep.runs.kind == kind][["run_id", *GRID]].merge(sel, on="run_id")


# ---- formatting ----------------------------------------------------------------------------------------------------
def fmt(v: float) -> str:
    return f"{v:.4g}" if v is not None and np.isfinite(v) else "—"


def fmt_pm(est: stats.Estimate) -> str:
    return f"{fmt(est.mean)} ± {fmt(est.sd)} (n={est.n})"


def fmt_ci(est: stats.Estimate) -> str:
    return f"[{fmt(est.lo)}, {fmt(est.hi)}]" if est.has_interval else "unavailable"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]


def save_figure(fig: plt.Figure, out: Path, name: str, wspace: float = 0.3) -> str:
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=wspace)  # fixed: tight_layout costs seconds
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


