"""The trade-off frontier across runs, like with like: one scoring rule, one set of activations at a time.

Input is the long table of curve points (one row per run, method, scoring rule and G) that
`Tracker.curve_points` reads from MLflow. A run contributes its progressive code: a vanilla SAE pruned by E[z^2]
(`prune_ez2`) and a Matryoshka SAE's own prefixes (`prefix`), under one scoring rule (`masked`, the primary
rule, or `reselect`; see docs/science.md). Two comparisons are made:
- at matched G: three Pareto sets across runs at every G, (dictionary size n, FVU), (L0, FVU) and
  (n, CE score); cost is minimised, FVU minimised, the CE score maximised;
- at matched L0 (`matched_l0`): points are binned by L0 on a fixed log-spaced grid (`L0_BINS_PER_OCTAVE` bins per
  doubling, edges 2**(i/4)) and each bin lists the best FVU of each method kind (pruned vanilla vs Matryoshka).
Runs are only ranked against runs on the same activations (model, revision, site, corpus, token budget and the
harvest's `activations_key`): every table carries an `activations` column and is computed per group.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from sae.evaluate import PRIMARY_RULE, principal_method  # noqa: E402

PROGRESSIVE_METHODS = ("prune_ez2", "prefix")
# the parent run's params that identify the activations a run was trained and scored on
ACTIVATION_FIELDS = ("model", "revision", "site", "corpus", "train_tokens", "activations_key")
L0_BINS_PER_OCTAVE = 4  # matched-L0 bins: [2**(i/4), 2**((i+1)/4)), i.e. points within a factor 1.19 of each other
NARROW_RANGE = 10.0  # an axis whose values span less than this factor is drawn linear (a log axis mislabels it)
CRITERIA = {
    # name: (cost column, quality column, quality is maximised)
    "size_vs_fvu": ("n_latents", "fvu", False),
    "l0_vs_fvu": ("l0", "fvu", False),
    "size_vs_ce_score": ("n_latents", "ce_score", True),
}
KINDS = ("vanilla", "matryoshka")
_UNKNOWN = "unknown"


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


# ---- activations groups ------------------------------------------------------------------------------------------
def _field_values(points: pd.DataFrame, field: str) -> pd.Series:
    if field not in points:
        return pd.Series(_UNKNOWN, index=points.index)
    col = points[field]
    return col.where(col.notna() & (col.astype(str) != ""), _UNKNOWN).astype(str)


def activations_label(points: pd.DataFrame) -> pd.Series:
    """One label per row naming its activations; rows lacking a field (older runs) say `unknown` for it.

    An unknown field never matches a known one: a run whose revision was not recorded is not assumed comparable.
    """
    if points.empty:
        return pd.Series(dtype=str)
    parts = [f + "=" + _field_values(points, f) for f in ACTIVATION_FIELDS]
    label = parts[0]
    for part in parts[1:]:
        label = label + ", " + part
    return label


def with_activations(points: pd.DataFrame) -> pd.DataFrame:
    """The points with an `activations` column (kept if already there)."""
    if points.empty or "activations" in points:
        return points
    return points.assign(activations=activations_label(points))


def activations_differences(points: pd.DataFrame) -> dict[str, list[str]]:
    """{field: its distinct values} for every activations field that differs between the points' runs."""
    if points.empty:
        return {}
    out = {}
    for field in ACTIVATION_FIELDS:
        values = sorted(set(_field_values(points, field)))
        if len(values) > 1:
            out[field] = values
    return out


def describe_activations(points: pd.DataFrame) -> str:
    """One line for the terminal: how many activations groups, and which fields tell them apart."""
    n = with_activations(points)["activations"].nunique() if not points.empty else 0
    if n <= 1:
        return "all runs share one set of activations"
    diff = "; ".join(f"{f}: {' vs '.join(v)}" for f, v in activations_differences(points).items())
    return (f"{n} activations groups, ranked separately (runs on different activations are not comparable); "
            f"they differ in {diff}")


# ---- matched G ---------------------------------------------------------------------------------------------------
def _kind(points: pd.DataFrame) -> np.ndarray:
    return np.where(points["partition"] != "none", "matryoshka", "vanilla")


def progressive_points(points: pd.DataFrame, methods: tuple[str, ...] = PROGRESSIVE_METHODS,
                       rule: str = PRIMARY_RULE) -> pd.DataFrame:
    """The rows a run contributes to the frontier: each run's own progressive code at each G, under `rule`."""
    if points.empty:
        return points
    prog = points[points["method"].isin(methods)]
    if "rule" in prog:
        prog = prog[prog["rule"] == rule]
    principal = np.where(prog["partition"] != "none", principal_method(True), principal_method(False))
    return with_activations(prog[prog["method"].to_numpy() == principal].copy())


def compute_frontier(points: pd.DataFrame, methods: tuple[str, ...] = PROGRESSIVE_METHODS,
                     rule: str = PRIMARY_RULE) -> pd.DataFrame:
    """Pareto rows for every activations group, G and criterion: columns G, criterion, rule, plus the point's."""
    prog = progressive_points(points, methods, rule)
    if prog.empty:
        return pd.DataFrame(columns=["G", "criterion", "rule", "activations"])
    out = []
    for _, at_g in prog.groupby(["activations", "G"]):
        for criterion, (cost, quality, maximise) in CRITERIA.items():
            if cost not in at_g or quality not in at_g:
                continue
            sub = at_g.dropna(subset=[cost, quality])
            if sub.empty:
                continue
            mask = pareto_mask(sub[cost].to_numpy(float), sub[quality].to_numpy(float), maximise)
            out.append(sub[mask].assign(criterion=criterion, rule=rule))
    if not out:
        return pd.DataFrame(columns=["G", "criterion", "rule", "activations"])
    cols = ["G", "criterion", "rule", "experiment", "run_name", "method", "architecture", "partition", "n_latents",
            "k", "seed", "l0"]
    df = pd.concat(out, ignore_index=True)
    df = df[[c for c in cols if c in df.columns] + [c for c in df.columns if c not in cols]]
    return df.sort_values(["activations", "criterion", "G", "n_latents"]).reset_index(drop=True)


# ---- matched L0 --------------------------------------------------------------------------------------------------
def l0_bin_index(l0: np.ndarray, per_octave: int = L0_BINS_PER_OCTAVE) -> np.ndarray:
    """Bin i holds L0 in [2**(i/per_octave), 2**((i+1)/per_octave)): a fixed grid, so sweeps share bins."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.floor(np.log2(np.asarray(l0, float)) * per_octave + 1e-9)


def matched_l0(points: pd.DataFrame, rule: str = PRIMARY_RULE, per_octave: int = L0_BINS_PER_OCTAVE) -> pd.DataFrame:
    """Per activations group and L0 bin, the best FVU of each method kind (pruned vanilla vs Matryoshka).

    Points are every run's progressive code under `rule` at every G; a bin compares what each kind achieves at
    (nearly) the same L0 whatever n or G it took. Columns: activations, rule, l0_lo, l0_hi, then per kind
    fvu_<kind>, l0_<kind>, G_<kind>, n_<kind>, run_<kind>, and `winner` (see `_winner`).
    """
    prog = progressive_points(points, rule=rule)
    if prog.empty or "l0" not in prog or "fvu" not in prog:
        return pd.DataFrame(columns=["activations", "rule", "l0_lo", "l0_hi", "winner"])
    prog = prog.dropna(subset=["l0", "fvu"])
    prog = prog[prog["l0"] > 0].assign(kind=lambda d: _kind(d), l0_bin=lambda d: l0_bin_index(d["l0"], per_octave))
    rows = []
    for (group, b), sub in prog.groupby(["activations", "l0_bin"]):
        row: dict = {"activations": group, "rule": rule, "l0_lo": 2 ** (b / per_octave),
                     "l0_hi": 2 ** ((b + 1) / per_octave)}
        for kind in KINDS:
            of_kind = sub[sub["kind"] == kind]
            best = of_kind.loc[of_kind["fvu"].idxmin()] if not of_kind.empty else None
            row[f"fvu_{kind}"] = best["fvu"] if best is not None else np.nan
            row[f"l0_{kind}"] = best["l0"] if best is not None else np.nan
            row[f"G_{kind}"] = best["G"] if best is not None else np.nan
            row[f"n_{kind}"] = best["n_latents"] if best is not None else np.nan
            row[f"run_{kind}"] = best["run_name"] if best is not None else ""
        row["winner"] = _winner(row["fvu_vanilla"], row["fvu_matryoshka"])
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["activations", "l0_lo"]).reset_index(drop=True)


def _winner(fvu_vanilla: float, fvu_matryoshka: float) -> str:
    """The kind with the lower FVU, "tie", or "only <kind>" when the other kind has no point in the bin."""
    missing = [kind for kind, v in zip(KINDS, (fvu_vanilla, fvu_matryoshka), strict=True) if np.isnan(v)]
    if missing:
        return "none" if len(missing) == 2 else f"only {KINDS[1 - KINDS.index(missing[0])]}"
    return "tie" if fvu_vanilla == fvu_matryoshka else KINDS[int(fvu_matryoshka < fvu_vanilla)]


# ---- text --------------------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.4f}"


def _by_group(table: pd.DataFrame, render) -> str:
    """Render per activations group, each under a header naming the group when there are several."""
    if "activations" not in table or table["activations"].nunique() <= 1:
        return render(table)
    return "\n\n".join(f"[activations: {g}]\n{render(sub)}" for g, sub in table.groupby("activations"))


def frontier_table(front: pd.DataFrame, criterion: str = "size_vs_fvu") -> str:
    """A compact text table for the terminal: one per activations group, with the scoring rule and L0."""
    sub = front[front["criterion"] == criterion] if "criterion" in front else front
    if sub.empty:
        return "(empty frontier)"
    cols = [c for c in ("G", "rule", "run_name", "method", "n_latents", "k", "l0", "fvu", "ce_score") if c in sub]
    return _by_group(sub, lambda t: t[cols].to_string(index=False, float_format=_fmt))


def matched_l0_table(table: pd.DataFrame) -> str:
    """The matched-L0 comparison as terminal text."""
    if table.empty:
        return "(no points with L0 and FVU)"
    cols = ["rule", "l0_lo", "l0_hi", "fvu_vanilla", "l0_vanilla", "fvu_matryoshka", "l0_matryoshka", "winner"]
    return _by_group(table, lambda t: t[[c for c in cols if c in t]].to_string(index=False, float_format=_fmt))


# ---- plots -------------------------------------------------------------------------------------------------------
def save_figure(fig: plt.Figure, path: Path | str) -> None:
    """Write a figure and free it: a long-lived driver draws many and pyplot keeps every open one alive."""
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plain(v: float, _pos=None) -> str:
    return f"{v:g}"


def set_axis_scale(ax: Axes, axis: str, values, ticks=None) -> None:
    """Log scale with plain labels when the values span >= NARROW_RANGE, else linear (fixed `ticks` if given).

    Matplotlib's default log axis labels minor ticks over a narrow span ("3x10^1 3.025x10^1 ..."), so a narrow
    span gets a linear axis, and a wide one labels only its major ticks, in plain numbers.
    """
    target = ax.xaxis if axis == "x" else ax.yaxis
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    log = v.size > 0 and v.min() > 0 and v.max() / v.min() >= NARROW_RANGE
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log" if log else "linear")
    if ticks is not None and 0 < len(ticks) <= 8:
        target.set_major_locator(FixedLocator(sorted(set(ticks))))
    elif log:
        decades = np.log10(v.max() / v.min())
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    else:
        target.set_major_locator(MaxNLocator(nbins=5))
    target.set_major_formatter(FuncFormatter(_plain))
    target.set_minor_formatter(NullFormatter())


def _plot_group(axes, prog: pd.DataFrame, front: pd.DataFrame, several_experiments: bool) -> None:
    for (label, exp), run in prog.groupby(["run_name", "experiment"]):
        run = run.sort_values("G")
        tag = f"{exp}:{label}" if several_experiments else label
        style = "-" if (run["partition"] != "none").any() else "--"
        axes[0].plot(run["G"], run["fvu"], style, marker="o", ms=3, label=tag)
        if "ce_score" in run:
            axes[1].plot(run["G"], run["ce_score"], style, marker="o", ms=3, label=tag)
        if "l0" in run:  # one curve per run: its L0 moves with G under the masked rule
            axes[2].plot(run["l0"], run["fvu"], style, marker="o", ms=3, label=tag)
    for ax, crit, (x, y) in ((axes[0], "size_vs_fvu", ("G", "fvu")), (axes[1], "size_vs_ce_score", ("G", "ce_score")),
                             (axes[2], "l0_vs_fvu", ("l0", "fvu"))):
        f = front[front["criterion"] == crit] if not front.empty else front
        if not f.empty and x in f and y in f:
            ax.scatter(f[x], f[y], s=70, facecolors="none", edgecolors="k", linewidths=1.2, label="Pareto (per G)")
    gs = sorted(prog["G"].unique())
    set_axis_scale(axes[0], "x", gs, ticks=gs)
    set_axis_scale(axes[0], "y", prog["fvu"])
    set_axis_scale(axes[1], "x", gs, ticks=gs)
    set_axis_scale(axes[2], "x", prog["l0"] if "l0" in prog else [])
    set_axis_scale(axes[2], "y", prog["fvu"])


def plot_frontier(points: pd.DataFrame, front: pd.DataFrame, title: str = "", rule: str = PRIMARY_RULE) -> plt.Figure:
    """FVU and CE score against G and FVU against L0, per run's progressive code; frontier points ringed.

    One row of panels per activations group (named above the row): runs on different activations never share
    a panel.
    """
    prog = progressive_points(points, rule=rule)
    groups = list(prog.groupby("activations")) if not prog.empty else [("", prog)]
    fig, axes = plt.subplots(len(groups), 3, figsize=(17, 5 * len(groups)), squeeze=False)
    several = not prog.empty and prog["experiment"].nunique() > 1
    for row, (group, sub) in zip(axes, groups, strict=True):
        if not sub.empty:
            f = front[front["activations"] == group] if "activations" in front and not front.empty else front
            _plot_group(row, sub, f, several)
        row[0].set(xlabel="latents kept G", ylabel="FVU", title="FVU vs G (lower is better)")
        row[1].set(xlabel="latents kept G", ylabel="CE loss score", title="Recaptured LM loss vs G")
        row[2].set(xlabel=f"L0 ({rule} rule)", ylabel="FVU", title="FVU vs L0, one curve per run")
        row[0].legend(fontsize=7)
        if len(groups) > 1:
            row[1].annotate(f"activations: {group}", (0.5, 1.12), xycoords="axes fraction", ha="center", fontsize=8)
    fig.suptitle(title or f"SAE Frontier ({rule} rule): pruned vanilla (dashed) vs Matryoshka (solid)")
    fig.tight_layout()
    return fig


def compare_experiments_figure(points: pd.DataFrame, rule: str = PRIMARY_RULE) -> plt.Figure:
    """Side by side: each experiment's best FVU per G (its lower envelope), one panel per activations group."""
    prog = progressive_points(points, rule=rule)
    groups = list(prog.groupby("activations")) if not prog.empty else [("", prog)]
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5), squeeze=False)
    for ax, (group, sub) in zip(axes[0], groups, strict=True):
        if not sub.empty:
            for (exp, kind), part in sub.assign(kind=_kind(sub)).groupby(["experiment", "kind"]):
                env = part.groupby("G")["fvu"].min()
                ax.plot(env.index, env.values, marker="o", ms=3, label=f"{exp} ({kind})")
            gs = sorted(sub["G"].unique())
            set_axis_scale(ax, "x", gs, ticks=gs)
            set_axis_scale(ax, "y", sub["fvu"])
            ax.legend(fontsize=7)
        title = "Frontiers of several sweeps" + (f"\nactivations: {group}" if len(groups) > 1 else "")
        ax.set(xlabel="latents kept G", ylabel=f"best FVU at G ({rule} rule)")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
