"""The five claims of docs/science.md, each computed from a `Sweep`: numbers, intervals, a verdict, a figure.

Every verdict follows the rule printed beside it (built from orchestrator/stats.py), so a reader can re-derive it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator import stats  # noqa: E402
from orchestrator.evidence import (  # noqa: E402
    GRID,
    PAIR,
    Claim,
    Sweep,
    column,
    curve,
    fmt,
    fmt_ci,
    fmt_pm,
    md_table,
    save_figure,
)
from orchestrator.frontier import set_axis_scale  # noqa: E402

CLAIM2 = {"fvu": "negative", "ce_score": "positive", "rsa": "positive"}  # sign of Matryoshka minus pruned vanilla
COST_BAND = (1.0, 1.5)  # "about 1.25x"
RULE_CLAIM2 = ("per (metric, G) under `masked`: confirmed if the paired 95% interval of (Matryoshka `prefix` − vanilla "
               "`prune_ez2`, one difference per seed) excludes 0 on the claimed side and every seed agrees in sign; "
               "refuted if the same holds on the other side; else inconclusive (always with one seed, except CE, "
               "whose context intervals are used); a cell with a run (either side) whose `monotone_fvu` = 0 is "
               "*undertrained*, not a verdict. Overall: confirmed if FVU is confirmed at a strict majority of the "
               "(group, G) cells with a verdict and no FVU, CE or RSA cell is refuted; refuted if FVU is refuted at a "
               "strict majority and confirmed at none; else inconclusive.")


# ---- claim 1: power law --------------------------------------------------------------------------------------------
def claim_power_law(sweep: Sweep, out: Path) -> Claim:
    c = Claim("1. Importance E[z²] of vanilla latents follows a power law",
              "confirmed if the power law is the preferred fit (lowest held-out error; the log-normal rank law, "
              "which nests it, must beat it by more than one standard error) in every vanilla run; refuted if the "
              "exponential or the log-normal wins in every run; else inconclusive.")
    van = sweep.runs[sweep.runs.kind == "vanilla"]
    first = {"power_law/heldout_mse_power_law": 0, "power_law/heldout_mse_exponential": 1}
    err_cols = sorted((k for k in van.columns if k.startswith("power_law/heldout_mse_")), key=lambda k: (first.get(k, 2), k))
    if "power_law/heldout_mse_power_law" not in err_cols or len(err_cols) < 2:
        c.lines.append("Not measured: no vanilla run has `power_law/heldout_mse_*` final metrics.")
        return c
    fits = [f.removeprefix("power_law/heldout_mse_") for f in err_cols]
    errs = van[err_cols].to_numpy(float)
    ok = np.isfinite(errs).all(axis=1)
    van, errs = van[ok], errs[ok]
    if not len(van):
        c.lines.append("Not measured: no vanilla run has every `power_law/heldout_mse_*` final metric.")
        return c
    winners = [fits[i] for i in errs.argmin(axis=1)]
    if "power_law/preferred_power_law" in van:  # the fit's own rule: the nested log-normal must win by > 1 SE
        pref = van["power_law/preferred_power_law"].to_numpy(float)
        winners = [w if not np.isfinite(p) else "power_law" if p == 1 else
                   (w if w != "power_law" else fits[1 + int(np.argmin(e[1:]))])
                   for p, w, e in zip(pref, winners, errs, strict=True)]
    ex, lo, hi = (column(van, f"power_law/{k}").to_numpy() for k in ("exponent", "exponent_lo", "exponent_hi"))
    rows = [[f"n={r.n_latents} k={r.k} {r.architecture} s{r.seed}", fmt(ex[j]), f"[{fmt(lo[j])}, {fmt(hi[j])}]",
             *(fmt(e) for e in errs[j]), winners[j]] for j, r in enumerate(van.itertuples())]
    c.lines += md_table(["run", "exponent", "bootstrap 95% interval", *(f"held-out MSE {f}" for f in fits), "best fit"], rows)
    spread = [[f"n={n} k={k} {a}", fmt_pm(stats.bootstrap_mean(column(g, "power_law/exponent")))]
              for (n, k, a), g in van.groupby(["n_latents", "k", "architecture"])]
    c.lines += ["Spread over seeds (exponent, mean ± sd):", "", *md_table(["group", "exponent"], spread)]
    n_pl = winners.count("power_law")
    c.verdict = "confirmed" if n_pl == len(winners) else "refuted" if n_pl == 0 else "inconclusive"
    c.lines.append(f"The power law is the preferred fit in {n_pl} of {len(winners)} vanilla runs.")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    a1.errorbar(range(len(ex)), ex, yerr=[np.abs(ex - lo), np.abs(hi - ex)], fmt="o", capsize=3)
    a1.set(xlabel="vanilla run", ylabel="power-law exponent", title="Exponent with bootstrap 95% interval")
    for j, f in enumerate(fits):
        a2.bar(np.arange(len(errs)) + j * 0.8 / len(fits), errs[:, j], width=0.8 / len(fits), label=f)
    a2.set(yscale="log", xlabel="vanilla run", ylabel="held-out MSE (log importance)", title="Held-out error per fit")
    a2.legend()
    c.figure = save_figure(fig, out, "claim1_power_law.png")
    return c


# ---- claim 2: Matryoshka vs pruned vanilla -------------------------------------------------------------------------
def undertrained_runs(sweep: Sweep) -> set[str]:
    """Runs whose progressive code failed the gate (masked FVU rises with G): no verdict rests on them."""
    return set(sweep.runs.loc[sweep.final("monotone_fvu") == 0, "run_id"])


def compare(sweep: Sweep, metric: str, rule: str, claimed: str, *, undertrained: set[str] = frozenset()) -> pd.DataFrame:
    """Matryoshka `prefix` minus vanilla `prune_ez2` at the same (n, k, architecture, seed) and G, one row per
    (Matryoshka group, G): both sides' mean ± sd and L0, the paired difference with its interval, and the verdict."""
    mat, van = curve(sweep, metric, "prefix", rule, "matryoshka"), curve(sweep, metric, "prune_ez2", rule, "vanilla")
    both = mat.merge(van, on=[*PAIR, "G"], suffixes=("_m", "_v"))
    if both.empty:
        return pd.DataFrame()
    l0m, l0v = (curve(sweep, "l0", m, rule, kind)[["run_id", "G", "value"]] for m, kind in
                (("prefix", "matryoshka"), ("prune_ez2", "vanilla")))
    l0 = {(r.run_id, r.G): r.value for r in pd.concat([l0m, l0v]).itertuples()}  # run ids tell the methods apart
    van_l0 = l0v.rename(columns={"value": "value_l0"}).merge(van[["run_id", "G", "value"]], on=["run_id", "G"])
    rows = []
    for (n, k, arch, part, g), cell in both.groupby(["n_latents", "k", "architecture", "partition_m", "G"]):
        est = stats.paired_bootstrap(cell.value_m.to_numpy(), cell.value_v.to_numpy())
        note = ""
        if est.n == 1 and metric == "ce_score":
            pair = cell[np.isfinite(cell.value_m) & np.isfinite(cell.value_v)].iloc[0]
            est, note = _context_interval(sweep, pair, rule), "one seed: CE context intervals"
        elif est.n == 1:
            note = "one seed: interval unavailable"
        verdict = stats.sign_verdict(est, claimed)
        if (set(cell.run_id_m) | set(cell.run_id_v)) & undertrained:
            verdict = "undertrained"
        matched = [_at_l0(van_l0[van_l0.run_id == r.run_id_v], l0.get((r.run_id_m, g), np.nan)) if metric == "fvu"
                   else np.nan for r in cell.itertuples()]
        rows.append({"group": f"n={n} k={k} {arch} {part}", "n": n, "G": g, "metric": metric, "rule": rule,
                     "mat": stats.bootstrap_mean(cell.value_m), "van": stats.bootstrap_mean(cell.value_v),
                     "mat_l0": np.nanmean([l0.get((r, g), np.nan) for r in cell.run_id_m]),
                     "van_l0": np.nanmean([l0.get((r, g), np.nan) for r in cell.run_id_v]),
                     "diff": est, "verdict": verdict, "note": note,
                     "matched_l0_diff": float(np.nanmean(cell.value_m.to_numpy() - np.array(matched))) if
                     np.isfinite(matched).any() else np.nan})
    return pd.DataFrame(rows)


def _context_interval(sweep: Sweep, pair: pd.Series, rule: str) -> stats.Estimate:
    """With one seed, the CE difference's interval is the widest one the two context-bootstrap intervals allow."""
    def at(metric: str, run: str, method: str) -> float:
        c = sweep.curves
        v = c[(c.run_id == run) & (c.metric == metric) & (c.method == method) & (c.rule == rule) & (c.G == pair.G)].value
        return float(v.iloc[0]) if len(v) else np.nan
    m_lo, m_hi = at("ce_score_lo", pair.run_id_m, "prefix"), at("ce_score_hi", pair.run_id_m, "prefix")
    v_lo, v_hi = at("ce_score_lo", pair.run_id_v, "prune_ez2"), at("ce_score_hi", pair.run_id_v, "prune_ez2")
    d = pair.value_m - pair.value_v
    return stats.Estimate(float(d), m_lo - v_hi, m_hi - v_lo, np.nan, 1, (float(d),))


def _at_l0(van_run: pd.DataFrame, l0: float) -> float:
    """The vanilla run's metric interpolated (log-log) at a Matryoshka point's L0; NaN outside its L0 range."""
    pts = van_run.groupby("value_l0")["value"].mean().reset_index().to_numpy(float)  # sorted, one point per L0
    if not np.isfinite(l0) or len(pts) < 2 or not pts[0, 0] <= l0 <= pts[-1, 0] or (pts <= 0).any():
        return np.nan
    return float(np.exp(np.interp(np.log(l0), np.log(pts[:, 0]), np.log(pts[:, 1]))))


def _compare_rows(df: pd.DataFrame, matched: bool) -> list[list[str]]:
    return [[r.group, str(r.G), fmt_pm(r.mat), fmt(r.mat_l0), fmt_pm(r.van), fmt(r.van_l0), fmt(r.diff.mean), fmt_ci(r.diff),
             *([fmt(r.matched_l0_diff)] if matched else []), r.verdict + (f" ({r.note})" if r.note else "")]
            for r in df.itertuples()]


COMPARE_HEADER = ["group", "G", "Matryoshka mean ± sd", "L0", "pruned vanilla mean ± sd", "L0", "difference",
                  "95% interval"]


def claim_matryoshka(sweep: Sweep, out: Path) -> Claim:
    c = Claim("2. At each G, Matryoshka beats pruned vanilla (FVU lower; CE score and RSA higher)", RULE_CLAIM2)
    gate = undertrained_runs(sweep)
    tables = {(m, r): compare(sweep, m, r, claimed, undertrained=gate) for m, claimed in CLAIM2.items()
              for r in ("masked", "reselect")}
    if all(t.empty for t in tables.values()):
        c.lines.append("Not measured: no Matryoshka `prefix` and vanilla `prune_ez2` curves at a shared (n, k, seed, G).")
        return c
    for (metric, rule), t in tables.items():
        if t.empty:
            c.lines += [f"**{metric}, `{rule}` rule**: not measured.", ""]
            continue
        extra = ["difference at matched L0"] if (metric, rule) == ("fvu", "masked") else []
        role = "primary rule" if rule == "masked" else "secondary rule, not in the verdict"
        c.lines += [f"**{metric}, `{rule}` rule** ({role}; difference = Matryoshka − vanilla, mean over seeds):", "",
                    *md_table([*COMPARE_HEADER, *extra, "verdict"], _compare_rows(t, bool(extra)))]
    cells = {m: list(tables[(m, "masked")].get("verdict", [])) for m in CLAIM2}
    c.verdict = stats.majority_verdict(cells["fvu"], cells["ce_score"] + cells["rsa"])
    if cells["fvu"] and all(v == "undertrained" for v in cells["fvu"]):
        c.lines.append("Every FVU comparison is undertrained (`monotone_fvu` = 0): no verdict can be drawn.")
    counts = {m: {v: cells[m].count(v) for v in (*stats.VERDICTS, "undertrained") if cells[m].count(v)} for m in CLAIM2}
    c.lines.append("Per-G verdicts under `masked`: " + "; ".join(f"{m}: {counts[m] or 'not measured'}" for m in CLAIM2))
    for label, reduced in (("reduced SAEs (G < n)", True), ("full dictionaries (G = n)", False)):
        parts = []
        for m in CLAIM2:
            t = tables[(m, "masked")]
            if not t.empty:
                v = list(t.verdict[(t.G < t.n) == reduced])
                parts.append(f"{m}: {({x: v.count(x) for x in sorted(set(v))}) or 'none'}")
        c.lines.append(f"Of which at {label}: " + "; ".join(parts) + ".")
    c.figure = _figure_claim2(sweep, tables[("fvu", "masked")], out) if not tables[("fvu", "masked")].empty else None
    return c


def _figure_claim2(sweep: Sweep, fvu: pd.DataFrame, out: Path) -> str:
    """FVU vs G per group (one colour per group in both left panels), the paired difference, and FVU vs L0."""
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(18, 5.2))
    for j, (group, t) in enumerate(fvu.groupby("group")):
        t, colour = t.sort_values("G"), f"C{j % 10}"
        for side, style in (("mat", "-"), ("van", "--")):
            mean, sd = np.array([e.mean for e in t[side]]), np.nan_to_num([e.sd for e in t[side]])
            a1.plot(t.G, mean, style, marker="o", ms=3, color=colour)
            a1.fill_between(t.G, mean - sd, mean + sd, alpha=0.15, color=colour)
        d = np.array([e.mean for e in t["diff"]])
        lo, hi = np.array([e.lo for e in t["diff"]]), np.array([e.hi for e in t["diff"]])
        a2.plot(t.G, d, marker="o", ms=3, label=group, color=colour)
        a2.fill_between(t.G, lo, hi, alpha=0.15, color=colour)
    a1.plot([], [], "k-", label="Matryoshka prefix")
    a1.plot([], [], "k--", label="vanilla prune_ez2")
    a2.axhline(0, color="k", lw=0.8)
    l0s = []
    for kind, method, style in (("matryoshka", "prefix", "o-"), ("vanilla", "prune_ez2", "s--")):
        pts = curve(sweep, "fvu", method, "masked", kind).merge(curve(sweep, "l0", method, "masked", kind)[["run_id", "G", "value"]],
                                                                 on=["run_id", "G"], suffixes=("", "_l0"))
        l0s += list(pts.value_l0)
        for _, run in pts.groupby("run_id"):
            run = run.sort_values("value_l0")
            a3.plot(run.value_l0, run.value, style, ms=3, alpha=0.6, color="C0" if kind == "matryoshka" else "C1")
        a3.plot([], [], style, color="C0" if kind == "matryoshka" else "C1", label=kind)
    a1.set(xscale="log", yscale="log", xlabel="latents kept G", ylabel="FVU (masked)", title="FVU vs G, mean ± sd over seeds")
    a2.set(xscale="log", xlabel="latents kept G", ylabel="FVU difference", title="Matryoshka − vanilla, 95% interval")
    a3.set(yscale="log", ylabel="FVU (masked)", xlabel="L0", title="FVU vs L0 (the matched-L0 view)")
    set_axis_scale(a3, "x", l0s)
    a1.legend(fontsize=8)
    a2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    a3.legend(fontsize=8)
    return save_figure(fig, out, "claim2_matryoshka_vs_pruned.png", wspace=0.8)


# ---- claim 3: orderings --------------------------------------------------------------------------------------------
def claim_orderings(sweep: Sweep, out: Path) -> Claim:
    c = Claim("3. E[z²] ordering beats frequency ordering, and both beat random subsets",
              "per G < n, paired over vanilla runs (seeds × n × k): both differences fvu(prune_ez2) − fvu(prune_freq) "
              "and fvu(prune_freq) − fvu(prune_random) under `masked` must have 95% intervals below 0 (confirmed at that "
              "G); an interval above 0 refutes at that G. Overall: confirmed if confirmed at every G, refuted if refuted "
              "at any G, else inconclusive.")
    parts = [curve(sweep, "fvu", m, "masked", "vanilla")[["run_id", "n_latents", "G", "value"]].rename(columns={"value": m})
             for m in ("prune_ez2", "prune_freq", "prune_random")]
    df = parts[0].merge(parts[1], on=["run_id", "n_latents", "G"]).merge(parts[2], on=["run_id", "n_latents", "G"])
    df = df[df.G < df.n_latents]
    if df.empty:
        c.lines.append("Not measured: no vanilla run has all three `fvu/prune_*.masked` curves below G = n.")
        return c
    std = curve(sweep, "fvu_std", "prune_random", "masked", "vanilla")[["run_id", "G", "value"]]
    df = df.merge(std.rename(columns={"value": "draw_sd"}), on=["run_id", "G"], how="left")
    rows, cells, plot = [], [], []
    for g, cell in df.groupby("G"):
        d1 = stats.paired_bootstrap(cell.prune_ez2.to_numpy(), cell.prune_freq.to_numpy())
        d2 = stats.paired_bootstrap(cell.prune_freq.to_numpy(), cell.prune_random.to_numpy())
        v = [stats.sign_verdict(d, "negative", unanimous=False) for d in (d1, d2)]
        verdict = "refuted" if "refuted" in v else "confirmed" if v == ["confirmed"] * 2 else "inconclusive"
        cells.append(verdict)
        means = [stats.bootstrap_mean(cell[m]) for m in ("prune_ez2", "prune_freq", "prune_random")]
        rows.append([str(g), *(fmt_pm(e) for e in means), fmt(cell.draw_sd.mean()), fmt(d1.mean), fmt_ci(d1), fmt(d2.mean),
                     fmt_ci(d2), verdict])
        plot.append((g, means, d1, d2))
    c.lines += md_table(["G", "ez2 FVU", "freq FVU", "random FVU (mean of draws)", "mean sd over draws", "ez2 − freq",
                       "95% interval", "freq − random", "95% interval", "verdict"], rows)
    c.verdict = stats.all_or_any_verdict(cells)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    gs = [p[0] for p in plot]
    for j, name in enumerate(("prune_ez2", "prune_freq", "prune_random")):
        m, s = np.array([p[1][j].mean for p in plot]), np.nan_to_num([p[1][j].sd for p in plot])
        a1.plot(gs, m, marker="o", ms=3, label=name)
        a1.fill_between(gs, m - s, m + s, alpha=0.2)
    for j, name in ((2, "ez2 − freq"), (3, "freq − random")):
        a2.errorbar(gs, [p[j].mean for p in plot], yerr=_yerr([p[j] for p in plot]), marker="o", capsize=3, label=name)
    a2.axhline(0, color="k", lw=0.8)
    a1.set(xscale="log", yscale="log", xlabel="G", ylabel="FVU (masked)", title="Pruning orderings, mean ± sd over runs")
    a2.set(xscale="log", xlabel="G", ylabel="FVU difference", title="Paired differences, 95% interval")
    a1.legend(), a2.legend()
    c.figure = save_figure(fig, out, "claim3_orderings.png")
    return c


def _yerr(ests: list[stats.Estimate]) -> np.ndarray:
    return np.nan_to_num(np.array([[e.mean - e.lo, e.hi - e.mean] for e in ests]).T)


# ---- claim 4: interpretability proxies -----------------------------------------------------------------------------
# the proxies with their confounds removed (frequency-matched, or against size-matched random subsets): these judge
# claim 4; the raw values are shown beside them; counts, baselines and spreads are bookkeeping, never a verdict
JUDGED_PROXIES = ("proxy/token_conc_excess", "proxy/token_conc_lift", "proxy/probe_acc_lift")
SHOWN_PROXIES = ("proxy/token_conc", "proxy/probe_acc")


def claim_interpretability(sweep: Sweep, out: Path) -> Claim:
    c = Claim("4. Pruned vanilla latents are at least as interpretable as Matryoshka's; inner groups more than outer",
              f"proxies only, judged on {', '.join(f'`{p}`' for p in JUDGED_PROXIES)} (frequency-matched token "
              "concentration and lifts over size-matched random subsets; higher = more interpretable; raw values "
              "shown, not judged; see docs/science.md): "
              "(a) Matryoshka `prefix` − vanilla `prune_ez2` at matched G, claimed ≤ 0; (b) innermost − outermost "
              "Matryoshka group, paired over Matryoshka runs, claimed > 0. Per cell as in claim 2 (interval and "
              "every pair agree). Overall: confirmed if most cells are confirmed and none refuted, refuted if most "
              "are refuted and none confirmed, else inconclusive.")
    c.lines += ["These are offline proxies for interpretability, not the LLM-judged auto-interpretation of the "
                "paper (docs/science.md, *Definitions: Interpretability*).", ""]
    cells: list[str] = []
    present = set(sweep.curves.metric.unique())
    tables = [compare(sweep, m, "masked", "negative", undertrained=undertrained_runs(sweep))
              for m in (*JUDGED_PROXIES, *SHOWN_PROXIES) if m in present]
    tables = [t for t in tables if not t.empty]
    if tables:
        t = pd.concat(tables, ignore_index=True)
        judged = t.metric.isin(JUDGED_PROXIES).to_numpy()
        verdicts = [v if j else f"(shown only: {v})" for v, j in zip(t.verdict, judged, strict=True)]
        c.lines += ["(a) Pruned vanilla vs Matryoshka at matched G (`masked`; difference = Matryoshka − vanilla):", "",
                    *md_table(["proxy", *COMPARE_HEADER, "verdict"],
                              [[m, *r[:-1], v] for m, r, v in zip(t.metric, _compare_rows(t, False), verdicts, strict=True)])]
        cells += list(t.verdict[judged])
        tables = [t for t in tables if t.metric.iloc[0] in JUDGED_PROXIES]
    groups = [g for g in _group_pairs(sweep) if f"proxy/{g[0]}" in (*JUDGED_PROXIES, *SHOWN_PROXIES)]
    if groups:
        rows = [[name, fmt_pm(stats.bootstrap_mean(i)), fmt_pm(stats.bootstrap_mean(o)), fmt(est.mean), fmt_ci(est),
                 v if f"proxy/{name}" in JUDGED_PROXIES else f"(shown only: {v})"] for name, i, o, est, v in groups]
        c.lines += ["(b) Matryoshka innermost vs outermost group (paired over Matryoshka runs; difference = inner − outer):",
                    "", *md_table(["proxy", "innermost mean ± sd", "outermost mean ± sd", "difference", "95% interval",
                                 "verdict"], rows)]
        cells += [g[4] for g in groups if f"proxy/{g[0]}" in JUDGED_PROXIES]
    if not cells:
        c.lines.append("Not measured: no `proxy/...` curves shared by both methods and no `proxy/group<i>/...` metrics.")
        return c
    c.verdict = stats.majority_verdict(cells)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t in tables:
        for side, style in (("mat", "-"), ("van", "--")):
            a1.plot(t.G, [e.mean for e in t[side]], style, marker="o", ms=3, label=f"{t.metric.iloc[0]} {side}")
    a1.set(xscale="log", xlabel="G", ylabel="proxy", title="Proxies vs G (solid Matryoshka, dashed vanilla)")
    groups = [g for g in groups if f"proxy/{g[0]}" in JUDGED_PROXIES]
    for j, (_, i, o, _, _) in enumerate(groups):
        a2.bar([j - 0.2, j + 0.2], [np.mean(i), np.mean(o)], width=0.4, color=["C0", "C1"])
    a2.set_xticks(range(len(groups)), [g[0] for g in groups], rotation=20, fontsize=7)
    a2.set(title="Innermost (left) vs outermost (right) group")
    if tables:
        a1.legend(fontsize=7)
    c.figure = save_figure(fig, out, "claim4_interpretability.png")
    return c


def _group_pairs(sweep: Sweep) -> list[tuple[str, np.ndarray, np.ndarray, stats.Estimate, str]]:
    """For each proxy/group<i>/<name>: innermost (i = 0) and outermost (largest i present) values per Matryoshka run."""
    cols = [k for k in sweep.runs.columns if k.startswith("proxy/group")]
    names = sorted({k.split("/", 2)[2] for k in cols if k.count("/") >= 2})
    mat = sweep.runs[sweep.runs.kind == "matryoshka"]
    out = []
    for name in names:
        idx = sorted(int(k.split("/")[1].removeprefix("group")) for k in cols if k.endswith(f"/{name}"))
        inner, outer = [], []
        for _, r in mat.iterrows():
            present = [i for i in idx if np.isfinite(r.get(f"proxy/group{i}/{name}", np.nan))]
            if len(present) >= 2 and present[0] == 0:
                inner.append(r[f"proxy/group0/{name}"])
                outer.append(r[f"proxy/group{present[-1]}/{name}"])
        if inner:
            est = stats.paired_bootstrap(inner, outer)
            out.append((name, np.array(inner), np.array(outer), est, stats.sign_verdict(est, "positive")))
    return out


# ---- claim 5: training cost ----------------------------------------------------------------------------------------
def claim_cost(sweep: Sweep, out: Path) -> Claim:
    c = Claim("5. Matryoshka training costs about 1.25× vanilla at the same n and k",
              f"ratio train_seconds(Matryoshka) / train_seconds(vanilla) per (n, k, architecture, seed) pair; confirmed "
              f"if the 95% interval of the mean ratio (orchestrator/stats.py) lies within [{COST_BAND[0]}, {COST_BAND[1]}], refuted if "
              "it lies entirely outside, else inconclusive.")
    r = sweep.runs[[*GRID, "kind", "run_id"]].assign(t=sweep.final("train_seconds"))
    pairs = r[r.kind == "matryoshka"].merge(r[r.kind == "vanilla"], on=PAIR, suffixes=("_m", "_v")).dropna(subset=["t_m", "t_v"])
    if pairs.empty:
        c.lines.append("Not measured: no Matryoshka and vanilla run with `train_seconds` at the same (n, k, seed).")
        return c
    est = stats.bootstrap_ratio(pairs.t_m.to_numpy(), pairs.t_v.to_numpy())
    spread = [[f"n={n} k={k} {a}", fmt_pm(stats.bootstrap_mean(g[g.kind == "vanilla"].t)),
               fmt_pm(stats.bootstrap_mean(g[g.kind == "matryoshka"].t))] for (n, k, a), g in r.groupby(["n_latents", "k", "architecture"])]
    c.lines += md_table(["group", "vanilla train_seconds", "Matryoshka train_seconds"], spread)
    c.lines += [f"Mean ratio over {est.n} pairs: **{fmt(est.mean)}** (sd {fmt(est.sd)}), 95% interval {fmt_ci(est)}.", "",
                "Wall time on a shared machine is noisy: concurrent trials and other load inflate both sides unevenly.", ""]
    c.verdict = stats.interval_verdict(est.lo, est.hi, lower=COST_BAND[0], upper=COST_BAND[1])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(range(len(est.values)), est.values, "o", label="pair ratio")
    ax.axhspan(*COST_BAND, color="g", alpha=0.1, label="claimed band")
    ax.axhline(est.mean, color="k", label="mean")
    if est.has_interval:
        ax.axhspan(est.lo, est.hi, color="k", alpha=0.15, label="95% interval")
    ax.set(xlabel="(n, k, seed) pair", ylabel="Matryoshka / vanilla train time", title="Training cost ratio")
    ax.legend(fontsize=7)
    c.figure = save_figure(fig, out, "claim5_cost.png")
    return c


# ---- the check behind claims 2-4: was every SAE trained long enough? ---------------------------------------------
PLATEAU_WINDOWS = ((0.5, 0.6), (0.7, 0.8))  # fractions of training; both before the lr decay of the last 20%
PLATEAU_DROP = 0.03  # a training FVU still falling by more than 3% between the windows has not plateaued


def training_drop(history: pd.DataFrame) -> float:
    """Relative fall of the training FVU from the first window to the second (see PLATEAU_WINDOWS)."""
    h = history.sort_values("step")
    end = float(h.step.max())
    means = [h[(h.step > a * end) & (h.step <= b * end)].value.mean() for a, b in PLATEAU_WINDOWS]
    return float((means[0] - means[1]) / means[0]) if np.isfinite(means).all() and means[0] > 0 else float("nan")


def training_budget(sweep: Sweep, out: Path) -> Claim:
    (w0, w1), (w2, w3) = PLATEAU_WINDOWS
    c = Claim("Training budget: did every SAE reach a plateau? (the check behind claims 2-4)",
              f"plateau if, in every group, the mean training FVU fell by less than {PLATEAU_DROP:.0%} between "
              f"{w0:.0%}-{w1:.0%} and {w2:.0%}-{w3:.0%} of training (constant lr, before the decay), for the whole "
              "dictionary and each Matryoshka SAE's innermost prefix, and every progressive code's masked FVU falls "
              "with G (`monotone_fvu`); else still improving.")
    t = sweep.training
    if t.empty:
        c.lines.append("Not measured: no trial logged a `train/fvu` history.")
        return c
    drops = []
    for run_id, h in t.groupby("run_id"):
        prefixes = sorted((m for m in h.metric.unique() if m.startswith("train/prefix_fvu/")),
                          key=lambda m: int(m.rsplit("/", 1)[1]))
        inner = training_drop(h[h.metric == prefixes[0]]) if prefixes else float("nan")
        drops.append({"run_id": run_id, "full": training_drop(h[h.metric == "train/fvu"]), "inner": inner})
    d = sweep.runs[[*GRID, "kind", "run_id"]].merge(pd.DataFrame(drops), on="run_id")
    d = d.assign(monotone=sweep.runs.set_index("run_id").reindex(d.run_id)["monotone_fvu"].to_numpy()
                 if "monotone_fvu" in sweep.runs else np.nan)
    rows, worst = [], 0.0
    for (part, n, k), g in d.groupby(["partition", "n_latents", "k"]):
        full, inner = stats.mean_sd(g.full.to_numpy()), stats.mean_sd(g.inner.to_numpy())
        worst = max([worst, *(v for v in (full[0], inner[0]) if np.isfinite(v))])
        mono = f"{int(np.nansum(g.monotone))} of {int(np.isfinite(g.monotone).sum())}"
        rows.append([part, str(n), str(k), f"{full[0]:.1%} ± {full[1]:.1%}",
                     "—" if part == "none" else f"{inner[0]:.1%} ± {inner[1]:.1%}", mono])
    c.lines += md_table(["partition", "n", "k", "FVU drop, whole dictionary", "FVU drop, innermost prefix",
                         "masked FVU falls with G"], rows)
    all_monotone = bool((d.monotone == 1).all())
    c.verdict = "plateau" if worst < PLATEAU_DROP and all_monotone else "still improving"
    c.lines.append(f"Largest group-mean drop: {worst:.1%}; runs whose masked FVU falls with G: "
                   f"{int((d.monotone == 1).sum())} of {len(d)}.")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    first = d.sort_values(GRID).groupby(["partition", "n_latents"]).head(1)
    for r in first.itertuples():
        h = t[(t.run_id == r.run_id) & (t.metric == "train/fvu")].sort_values("step")
        ax.plot(h.step, h.value, lw=1, label=f"{r.partition} n={r.n_latents} k={r.k} s{r.seed}")
    ax.set(yscale="log", xlabel="training tokens seen", ylabel="training FVU (whole dictionary)",
           title="Training curves (first seed of each partition and n)")
    for a, b in PLATEAU_WINDOWS:
        ax.axvspan(a * t.step.max(), b * t.step.max(), color="k", alpha=0.06)
    ax.legend(fontsize=6, ncol=2)
    c.figure = save_figure(fig, out, "training_budget.png")
    return c


CLAIMS: tuple[Callable[[Sweep, Path], Claim], ...] = (training_budget, claim_power_law, claim_matryoshka,
                                                      claim_orderings, claim_interpretability, claim_cost)
