"""The frontier holds exactly the non-dominated points (checked against a brute-force Pareto computation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.frontier import CRITERIA, compute_frontier, pareto_mask, progressive_points


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
