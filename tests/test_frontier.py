"""The frontier: exactly the non-dominated points (against a brute-force Pareto), per scoring rule and per set of
activations, at matched G and matched L0; its plot is readable; curve_points reads the `<metric>/<method>.<rule>` keys
back from a real MLflow store."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from orchestrator.frontier import (
    CRITERIA,
    L0_BINS_PER_OCTAVE,
    activations_differences,
    activations_label,
    compute_frontier,
    describe_activations,
    frontier_table,
    matched_l0,
    matched_l0_table,
    pareto_mask,
    plot_frontier,
    progressive_points,
)
from orchestrator.sweep import compare
from orchestrator.tracking import (
    ACTIVATION_PARAMS,
    POINT_COLUMNS,
    Tracker,
    parse_curve_key,
)

ROOT = Path(__file__).resolve().parent.parent


def brute_force_pareto(costs, qualities, maximise):
    q = -np.asarray(qualities, float) if maximise else np.asarray(qualities, float)
    c = np.asarray(costs, float)
    keep = []
    for i in range(len(c)):
        dominated = any(
            c[j] <= c[i] and q[j] <= q[i] and (c[j] < c[i] or q[j] < q[i]) for j in range(len(c)) if j != i
        )
        keep.append(not dominated)
    return np.array(keep, dtype=bool)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=25),
    st.booleans(),
)
def test_pareto_mask_equals_brute_force(pairs, maximise):
    costs = np.array([p[0] for p in pairs], float)
    quals = np.array([p[1] for p in pairs], float)
    assert (pareto_mask(costs, quals, maximise) == brute_force_pareto(costs, quals, maximise)).all()


def synthetic_points(seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for run, (n, k, part) in enumerate([(256, 8, "none"), (256, 16, "none"), (512, 8, "doubling:2"), (512, 16, "none")]):
        for method in ("prune_ez2", "prune_random", "prefix"):
            if (method == "prefix") != (part != "none") and method != "prune_random":
                continue
            for g in (64, 128, 256, 512):
                if g > n:
                    continue
                rows.append(dict(experiment="e", run_id=f"r{run}", run_name=f"run{run}", n_latents=n, k=k,
                                 architecture="topk", partition=part, seed=0, method=method, G=g,
                                 fvu=float(rng.uniform(0.05, 0.5)), l0=float(k * rng.uniform(0.8, 1.0)),
                                 ce_score=float(rng.uniform(0.5, 1.0))))
    return pd.DataFrame(rows)


def test_frontier_contains_only_non_dominated_points():
    points = synthetic_points()
    front = compute_frontier(points)
    prog = progressive_points(points)
    assert set(prog["method"]) == {"prune_ez2", "prefix"}
    for criterion, (cost, quality, maximise) in CRITERIA.items():
        for g, at_g in prog.groupby("G"):
            expected = at_g[brute_force_pareto(at_g[cost], at_g[quality], maximise)]
            got = front[(front["criterion"] == criterion) & (front["G"] == g)]
            assert sorted(got["run_id"]) == sorted(expected["run_id"]), (criterion, g)


# ---- scoring rules, matched L0, activations groups ----------------------------------------------------------------
def curve_rows(run: str, partition: str, method: str, rule: str, l0s, fvus, *, n=256, k=32, site="resid_post.3",
               experiment="e") -> list[dict]:
    """Long rows of one run's curve, in the layout Tracker.curve_points returns."""
    gs = [32 * 2**i for i in range(len(l0s))]
    return [dict(experiment=experiment, run_id=f"{experiment}-{run}", parent_run_id=f"p-{experiment}", run_name=run,
                 n_latents=n, k=k, architecture="topk", partition=partition, seed=0, method=method, rule=rule, G=g,
                 model="m", revision="main", site=site, corpus="c", train_tokens="1000", activations_key=f"key-{site}",
                 l0=l0, fvu=fvu)
            for g, l0, fvu in zip(gs, l0s, fvus, strict=True)]


def test_matched_l0_picks_the_better_kind_per_bin():
    rows = (curve_rows("van", "none", "prune_ez2", "masked", [10, 20, 40], [0.5, 0.3, 0.2])
            + curve_rows("mat", "doubling:32", "prefix", "masked", [10.5, 21, 41], [0.4, 0.35, 0.1])
            # decoys: not the run's progressive code, or another rule: they must not win any bin
            + curve_rows("van", "none", "prune_random", "masked", [10, 20, 40], [0.01, 0.01, 0.01])
            + curve_rows("mat", "doubling:32", "prune_ez2", "masked", [10, 20, 40], [0.01, 0.01, 0.01])
            + curve_rows("van", "none", "prune_ez2", "reselect", [32, 32, 32], [0.01, 0.01, 0.01]))
    table = matched_l0(pd.DataFrame(rows))
    assert list(table["winner"]) == ["matryoshka", "vanilla", "matryoshka"]
    assert list(table["fvu_vanilla"]) == [0.5, 0.3, 0.2] and list(table["fvu_matryoshka"]) == [0.4, 0.35, 0.1]
    assert (table["rule"] == "masked").all()
    # bins are the stated log-spaced grid: each holds both kinds' L0 and spans a factor 2**(1/4)
    assert np.allclose(table["l0_hi"] / table["l0_lo"], 2 ** (1 / L0_BINS_PER_OCTAVE))
    for kind in ("vanilla", "matryoshka"):
        assert ((table["l0_lo"] <= table[f"l0_{kind}"]) & (table[f"l0_{kind}"] < table["l0_hi"])).all()
    reselect = matched_l0(pd.DataFrame(rows), rule="reselect")
    assert list(reselect["winner"]) == ["only vanilla"] and reselect["fvu_vanilla"].iloc[0] == 0.01
    assert "masked" in matched_l0_table(table) and "matryoshka" in matched_l0_table(table)


def test_runs_on_different_activations_never_share_a_pareto_set():
    # run b (site 5) dominates run a (site 3) everywhere; each must still be on the frontier of its own group
    rows = (curve_rows("a", "none", "prune_ez2", "masked", [10, 20, 40], [0.5, 0.3, 0.2], site="resid_post.3")
            + curve_rows("c", "none", "prune_ez2", "masked", [10, 20, 40], [0.6, 0.4, 0.3], n=512,
                         site="resid_post.3")
            + curve_rows("b", "none", "prune_ez2", "masked", [10, 20, 40], [0.1, 0.1, 0.1], site="resid_post.5"))
    points = pd.DataFrame(rows)
    front = compute_frontier(points)
    assert front["activations"].nunique() == 2 and (front["rule"] == "masked").all()
    for (group, criterion, g), sub in front.groupby(["activations", "criterion", "G"]):
        assert sub["site"].nunique() == 1, (group, criterion, g)
    size = front[front["criterion"] == "size_vs_fvu"]
    assert set(size["run_name"]) == {"a", "b"}  # c is dominated by a in its own group, a survives b
    assert describe_activations(points).startswith("2 activations groups")
    assert "site: resid_post.3 vs resid_post.5" in describe_activations(points)
    assert set(activations_differences(points)) == {"site", "activations_key"}
    assert frontier_table(front).count("[activations:") == 2
    assert matched_l0(points)["activations"].nunique() == 2


def test_older_runs_without_revision_are_not_pooled_with_newer_ones():
    new = pd.DataFrame(curve_rows("a", "none", "prune_ez2", "masked", [10, 20], [0.5, 0.3]))
    old = new.assign(run_id="old", run_name="old", revision=None, activations_key=None)
    both = pd.concat([new, old], ignore_index=True)
    assert activations_label(both).nunique() == 2
    assert activations_differences(both)["revision"] == ["main", "unknown"]


def _tick_labels_overlap(ax) -> tuple[int, bool]:
    ax.figure.canvas.draw()
    ticks = ax.get_xticklabels() + ax.get_xticklabels(minor=True)  # matplotlib labels minor ticks on a short log span
    labels = [t for t in ticks if t.get_text() and t.get_visible()]
    lo, hi = sorted(ax.get_xlim())
    labels = [t for t in labels if lo <= t.get_position()[0] <= hi]
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    return len(labels), any(a.x1 > b.x0 for a, b in zip(boxes, boxes[1:], strict=False))


def test_plot_l0_panel_is_readable_for_narrow_and_wide_l0_ranges():
    narrow = (curve_rows("van", "none", "prune_ez2", "masked", [30.0, 30.25, 30.5, 30.75], [0.5, 0.4, 0.3, 0.2])
              + curve_rows("mat", "doubling:32", "prefix", "masked", [30.1, 30.3, 30.6, 30.7], [0.45, 0.35, 0.3, 0.1]))
    wide = (curve_rows("van", "none", "prune_ez2", "masked", [2.0, 5.0, 15.0, 60.0], [0.5, 0.4, 0.3, 0.2])
            + curve_rows("mat", "doubling:32", "prefix", "masked", [3.0, 8.0, 20.0, 64.0], [0.45, 0.35, 0.3, 0.1]))
    for rows, scale in ((narrow, "linear"), (wide, "log")):
        points = pd.DataFrame(rows)
        fig = plot_frontier(points, compute_frontier(points))
        ax = fig.axes[2]
        assert ax.get_xscale() == scale
        n_labels, overlap = _tick_labels_overlap(ax)
        assert 2 <= n_labels <= 8 and not overlap, (scale, [t.get_text() for t in ax.get_xticklabels()])
        texts = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)]
        assert not any("10^" in t or "times" in t for t in texts), texts  # plain numbers, no "3x10^1"
        # one FVU-vs-L0 curve per run, through that run's (L0, FVU) points in G order
        curves = {tuple(np.round(line.get_xdata(), 3)) for line in ax.get_lines()}
        assert tuple(np.round(points[points["run_name"] == "van"]["l0"], 3)) in curves
        plt.close(fig)


def test_plot_draws_one_row_per_activations_group():
    rows = (curve_rows("a", "none", "prune_ez2", "masked", [10, 20], [0.5, 0.3], site="resid_post.3")
            + curve_rows("b", "none", "prune_ez2", "masked", [10, 20], [0.1, 0.1], site="resid_post.5"))
    fig = plot_frontier(pd.DataFrame(rows), compute_frontier(pd.DataFrame(rows)))
    assert len(fig.axes) == 6
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sum("site=resid_post.3" in t for t in texts) == 1 and sum("site=resid_post.5" in t for t in texts) == 1
    plt.close(fig)


def test_frontier_table_shows_rule_and_l0():
    points = pd.DataFrame(curve_rows("a", "none", "prune_ez2", "masked", [10, 20], [0.5, 0.3]))
    header = frontier_table(compute_frontier(points)).splitlines()[0].split()
    assert {"rule", "l0", "G", "fvu"} <= set(header)


# ---- reading MLflow: curve_points on a real SQLite store ----------------------------------------------------------
def _sweep(tracker: Tracker, name: str, activations: dict, children: dict[str, tuple[dict, dict]]) -> str:
    """A parent and its finished children; curve keys are the contract's, stored as MLflow accepts them."""
    parent = tracker.parent_run(name, name=name, spec_hash="h", spec_yaml="", params={"spec": name, **activations})
    for run_name, (params, curves) in children.items():
        run = tracker.child_run(parent, f"{name}-{run_name}", tune_trial=run_name, name=run_name, params=params)
        tracker.log_curves(run, curves)
        tracker.log_metrics(run, {"power_law/exponent": 1.1, "fvu": 0.1})  # final metrics: not curve points
        tracker.log_curves(run, {"spectrum/eigenvalue": [[1, 3.0], [2, 1.0]], "train/prefix_fvu/64": [[100, 0.2]]})
        tracker.finish(run)
    tracker.finish(parent)
    return parent


def test_curve_points_parse_rule_keys_and_attach_activations(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")
    ident = {"model": "m", "revision": "r1", "site": "resid_post.3", "corpus": "c", "train_tokens": 1000,
             "activations_key": "abc"}
    vanilla = {"n_latents": 128, "k": 8, "architecture": "topk", "partition": "none", "seed": 0}
    matryoshka = {**vanilla, "partition": "doubling:32"}
    parent = _sweep(tracker, "s1", ident, {
        "van": (vanilla, {"fvu/prune_ez2.masked": [[32, 0.4], [64, 0.3]], "l0/prune_ez2.masked": [[32, 3.0], [64, 5.5]],
                          "fvu/prune_ez2.reselect": [[32, 0.35], [64, 0.28]], "l0/prune_ez2.reselect": [[32, 8], [64, 8]],
                          "fvu_std/prune_random.masked": [[32, 0.01]], "fvu/prune_random.masked": [[32, 0.6]]}),
        "mat": (matryoshka, {"fvu/prefix.masked": [[32, 0.3], [64, 0.2]], "l0/prefix.masked": [[32, 4.0], [64, 6.0]],
                             "ce_score/prefix.masked": [[32, 0.7]], "ce_score_lo/prefix.masked": [[32, 0.6]],
                             "proxy/token_conc/prefix.masked": [[32, 0.25]]}),
    })
    # an older sweep: no revision / activations_key, curves under the legacy `<metric>/<method>` keys
    old_ident = {k: v for k, v in ident.items() if k not in ("revision", "activations_key")}
    _sweep(tracker, "s0", old_ident, {"old": (vanilla, {"fvu/prune_ez2": [[32, 0.5]], "l0/prune_ez2": [[32, 8.0]]})})

    points = tracker.curve_points(["exp"])
    assert list(points.columns[:12]) == list(POINT_COLUMNS)
    mine = points[points["parent_run_id"] == parent]
    van = mine[mine["run_name"] == "van"].set_index(["method", "rule", "G"])
    assert van.loc[("prune_ez2", "masked", 64), ["fvu", "l0"]].tolist() == [0.3, 5.5]
    assert van.loc[("prune_ez2", "reselect", 32), ["fvu", "l0"]].tolist() == [0.35, 8.0]
    assert van.loc[("prune_random", "masked", 32), "fvu_std"] == 0.01
    mat = mine[mine["run_name"] == "mat"].set_index(["method", "rule", "G"])
    row = mat.loc[("prefix", "masked", 32)]
    assert (row["ce_score"], row["ce_score_lo"], row["proxy/token_conc"], row["l0"]) == (0.7, 0.6, 0.25, 4.0)
    assert np.isnan(mat.loc[("prefix", "masked", 64), "ce_score"])
    assert len(mine) == 2 + 2 + 1 + 2  # van masked x2, reselect x2, random x1; mat masked x2
    assert not {"spectrum/eigenvalue", "train/prefix_fvu", "power_law/exponent", "eigenvalue"} & set(points.columns)
    assert (mine[list(ACTIVATION_PARAMS)].drop_duplicates().to_dict("records")
            == [{"model": "m", "revision": "r1", "site": "resid_post.3", "corpus": "c", "train_tokens": "1000",
                 "activations_key": "abc"}])
    old = points[points["run_name"] == "old"].iloc[0]
    assert (old["rule"], old["fvu"], old["site"]) == ("reselect", 0.5, "resid_post.3")
    assert pd.isna(old["revision"]) and pd.isna(old["activations_key"])
    # the two sweeps are on activations that cannot be shown equal: separate frontiers
    assert compute_frontier(points, rule="reselect")["activations"].nunique() == 2


def test_parse_curve_key(tmp_path):
    assert parse_curve_key("proxy/token_conc/prune_ez2.masked") == ("proxy/token_conc", "prune_ez2", "masked")
    assert parse_curve_key("fvu_std/prune_random.reselect") == ("fvu_std", "prune_random", "reselect")
    assert parse_curve_key("fvu/prefix") == ("fvu", "prefix", "reselect")  # legacy: before scoring rules
    for key in ("fvu", "train/loss", "spectrum/eigenvalue", "power_law/exponent", "train/prefix_fvu/64", "a/.masked",
                "spectrum_fit/r2.adj", "fvu/prefix@masked"):
        assert parse_curve_key(key) is None, key
    # why the rule is joined by a dot: MLflow refuses '@' in a metric name
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "x")
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    with pytest.raises(MlflowException, match="Invalid value"):
        tracker.log_metrics(run, {"fvu/prefix@masked": 1.0})
    tracker.log_metrics(run, {"fvu/prefix.masked": 1.0})


def test_compare_groups_by_activations_and_names_the_difference(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    vanilla = {"n_latents": 128, "k": 8, "architecture": "topk", "partition": "none", "seed": 0}
    curves = {"fvu/prune_ez2.masked": [[32, 0.4], [64, 0.3]], "l0/prune_ez2.masked": [[32, 3.0], [64, 5.5]]}
    for exp, site in (("exp-a", "resid_post.3"), ("exp-b", "resid_post.5")):
        ident = {"model": "m", "revision": "r1", "site": site, "corpus": "c", "train_tokens": 1000,
                 "activations_key": f"key-{site}"}
        _sweep(Tracker(uri, exp), exp, ident, {f"van-{exp}": (vanilla, curves)})
    frontier, out = compare(["exp-a", "exp-b"], uri, str(tmp_path / "cmp"))
    assert {"frontier.csv", "frontier.png", "compare.png", "matched_l0.csv", "activations.txt"} <= {
        p.name for p in out.iterdir()}
    # identical curves, different activations: each run tops its own group's frontier, never the other's
    for _, sub in frontier.groupby(["activations", "criterion", "G"]):
        assert sub["experiment"].nunique() == 1
    assert frontier["activations"].nunique() == 2
    assert "differ in site: resid_post.3 vs resid_post.5" in (out / "activations.txt").read_text()

    spec = importlib.util.spec_from_file_location("frontier_cli", ROOT / "sweeps" / "frontier.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--compare", "exp-a", "exp-b", "--tracking-uri", uri, "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "site: resid_post.3 vs resid_post.5" in printed
    assert printed.count("[activations:") >= 4  # frontier and matched-L0 tables, once per group each
