"""The trade-off frontier across runs: Pareto sets at every granularity G, tabled and plotted.

Input is the long table of curve points (one row per run, method and G) that `Tracker.curve_points` reads
from MLflow. A run contributes its progressive code: a vanilla SAE pruned by E[z^2] (`prune_ez2`) and a
Matryoshka SAE's own prefixes (`prefix`). At each G three Pareto sets are taken across runs:
(dictionary size n, FVU), (L0, FVU) and (dictionary size n, CE score); all minimise cost, FVU is minimised and
the CE score maximised.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sae.evaluate import principal_method  # noqa: E402

PROGRESSIVE_METHODS = ("prune_ez2", "prefix")
CRITERIA = {
    # name: (cost column, quality column, quality is maximised)
    "size_vs_fvu": ("n_latents", "fvu", False),
    "l0_vs_fvu": ("l0", "fvu", False),
    "size_vs_ce_score": ("n_latents", "ce_score", True),
}


def pareto_mask(costs: np.ndarray, qualities: np.ndarray, maximise: bool) -> np.ndarray:
    """True where no other point is at least as good on both axes and strictly better on one."""
    q = -qualities if maximise else qualities
    keep = np.ones(len(costs), dtype=bool)
    order = np.lexsort((q, costs))  # by cost, then by quality
    best = np.inf
    for i in order:
        if q[i] < best:
            best = q[i]
        else:
            keep[i] = False
    # equal points (same cost and quality) are all kept: none dominates the other
    for i in np.flatnonzero(~keep):
        same = (costs == costs[i]) & (q == q[i]) & keep
        if same.any():
            keep[i] = True
    return keep


def progressive_points(points: pd.DataFrame, methods: tuple[str, ...] = PROGRESSIVE_METHODS) -> pd.DataFrame:
    """The rows a run contributes to the frontier: each run's own progressive code at each G."""
    if points.empty:
        return points
    prog = points[points["method"].isin(methods)]
    principal = np.where(prog["partition"] != "none", principal_method(True), principal_method(False))
    return prog[prog["method"].to_numpy() == principal].copy()


def compute_frontier(points: pd.DataFrame, methods: tuple[str, ...] = PROGRESSIVE_METHODS) -> pd.DataFrame:
    """Pareto rows for every G and criterion: columns G, criterion, plus the point's columns."""
    prog = progressive_points(points, methods)
    out = []
    if prog.empty:
        return pd.DataFrame(columns=["G", "criterion"])
    for _, at_g in prog.groupby("G"):
        for criterion, (cost, quality, maximise) in CRITERIA.items():
            sub = at_g.dropna(subset=[cost, quality])
            if sub.empty:
                continue
            mask = pareto_mask(sub[cost].to_numpy(float), sub[quality].to_numpy(float), maximise)
            front = sub[mask].assign(criterion=criterion)
            out.append(front)
    if not out:
        return pd.DataFrame(columns=["G", "criterion"])
    cols = ["G", "criterion", "experiment", "run_name", "method", "architecture", "partition", "n_latents", "k", "seed"]
    df = pd.concat(out, ignore_index=True)
    rest = [c for c in df.columns if c not in cols]
    return df[[c for c in cols if c in df.columns] + rest].sort_values(["criterion", "G", "n_latents"]).reset_index(drop=True)


def frontier_table(front: pd.DataFrame, criterion: str = "size_vs_fvu") -> str:
    """A compact text table for the terminal."""
    sub = front[front["criterion"] == criterion]
    cols = [c for c in ("G", "run_name", "method", "n_latents", "k", "l0", "fvu", "ce_score") if c in sub.columns]
    if sub.empty:
        return "(empty frontier)"
    return sub[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")


def plot_frontier(points: pd.DataFrame, front: pd.DataFrame, title: str = "") -> plt.Figure:
    """FVU and CE score against G for every run's progressive code; frontier points ringed."""
    prog = progressive_points(points)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for (label, exp), run in prog.groupby(["run_name", "experiment"]):
        run = run.sort_values("G")
        tag = label if prog["experiment"].nunique() == 1 else f"{exp}:{label}"
        style = "-" if (run["partition"] != "none").any() else "--"
        axes[0].plot(run["G"], run["fvu"], style, marker="o", ms=3, label=tag)
        if "ce_score" in run:
            axes[1].plot(run["G"], run["ce_score"], style, marker="o", ms=3, label=tag)
        if "l0" in run:
            axes[2].scatter(run["l0"], run["fvu"], s=12, label=tag)
    for ax, crit, (x, y) in ((axes[0], "size_vs_fvu", ("G", "fvu")), (axes[1], "size_vs_ce_score", ("G", "ce_score")), (axes[2], "l0_vs_fvu", ("l0", "fvu"))):
        f = front[front["criterion"] == crit] if not front.empty else front
        if not f.empty and y in f:
            ax.scatter(f[x], f[y], s=70, facecolors="none", edgecolors="k", linewidths=1.2, label="Pareto (per G)")
    axes[0].set(xscale="log", yscale="log", xlabel="latents kept G", ylabel="FVU", title="FVU vs G (lower is better)")
    axes[1].set(xscale="log", xlabel="latents kept G", ylabel="CE loss score", title="Recaptured LM loss vs G")
    axes[2].set(xscale="log", yscale="log", xlabel="L0", ylabel="FVU", title="FVU vs L0, all G")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "SAE Frontier: pruned vanilla (dashed) vs Matryoshka (solid)")
    fig.tight_layout()
    return fig


def compare_experiments_figure(points: pd.DataFrame) -> plt.Figure:
    """Side by side: each experiment's best FVU per G (its lower envelope), for `--compare`."""
    prog = progressive_points(points)
    fig, ax = plt.subplots(figsize=(7, 5))
    for (exp, arch), sub in prog.assign(kind=np.where(prog["partition"] != "none", "matryoshka", "vanilla")).groupby(["experiment", "kind"]):
        env = sub.groupby("G")["fvu"].min()
        ax.plot(env.index, env.values, marker="o", ms=3, label=f"{exp} ({arch})")
    ax.set(xscale="log", yscale="log", xlabel="latents kept G", ylabel="best FVU at G", title="Frontiers of several sweeps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
