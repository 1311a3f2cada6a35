"""Figures for importance spectra and pruning curves; each helper returns a matplotlib Figure to save.

Figures are built with the object-oriented API (`matplotlib.figure.Figure`, Agg canvas), never pyplot, so
they work headless, in Ray workers and in threads, and leave a notebook's backend alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from sae.importance import PowerLawFit, fit_power_law


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_importance(
    importance: Tensor,
    fit: PowerLawFit | None = None,
    *,
    label: str = "E[z^2]",
    title: str | None = None,
) -> Figure:
    """Importance vs rank on log-log axes: every latent, the fit window (shaded), its rank bins and the three
    fitted laws over the window, each labelled with its held-out error so the preferred law is visible."""
    imp = torch.sort(importance.detach().reshape(-1).to(torch.float64).cpu(), descending=True).values
    live = imp[imp > 0]
    if live.numel() == 0:
        raise ValueError("importance has no positive entries to plot (every latent is dead)")
    if fit is None:
        fit = fit_power_law(live)
    fig = _figure((6.0, 4.4))
    ax = fig.add_subplot()
    rank = torch.arange(1, live.numel() + 1, dtype=torch.float64)
    ax.loglog(rank.numpy(), live.numpy(), ".", ms=2, color="0.6", label=f"{label} ({live.numel()} live latents)")
    ax.axvspan(fit.min_rank, fit.max_rank, color="C2", alpha=0.08,
               label=f"fit window {fit.min_rank}-{fit.max_rank} (head {fit.dense_head}, {fit.n_too_rare} too rare)")
    if fit.bin_rank is not None and fit.bin_importance is not None:
        ax.loglog(fit.bin_rank.numpy(), fit.bin_importance.numpy(), "o", ms=4, mfc="none", color="k",
                  label=f"{fit.n_bins} log-spaced rank bins")
    r = torch.logspace(math.log10(fit.min_rank), math.log10(fit.max_rank), 200, dtype=torch.float64)
    fits = (("power_law", "-", "C0",
             f"power law: exponent {fit.exponent:.3g} [{fit.exponent_lo:.3g}, {fit.exponent_hi:.3g}]"),
            ("exponential", "--", "C3", f"exponential: rate {fit.exp_rate:.3g}"),
            ("lognormal", ":", "C1", f"log-normal: curvature {fit.ln_curvature:.3g}"))
    for kind, style, color, text in fits:
        mse = getattr(fit, f"heldout_mse_{kind}")
        ax.loglog(r.numpy(), fit.predict(r, kind).numpy(), style, color=color, label=f"{text}, held-out MSE {mse:.3g}")
    ax.set_xlabel("rank")
    ax.set_ylabel(label)
    ax.set_title(title or f"importance vs rank (preferred by held-out error: {fit.preferred})")
    ax.legend(fontsize="x-small", loc="lower left")
    return fig


def plot_pruning_curves(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    *,
    metric: str = "fvu",
    title: str | None = None,
    log_y: bool = False,
) -> Figure:
    """`metric` vs latents kept G (log x), one line per labelled curve (e.g. "ez2", "random", "matryoshka")."""
    if not curves:
        raise ValueError("curves is empty; pass {label: [{'G': g, metric: value}, ...]}")
    fig = _figure((5.5, 4.0))
    ax = fig.add_subplot()
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["G"])
        missing = [r["G"] for r in rows if metric not in r]
        if missing:
            raise ValueError(f"curve {label!r} has no {metric!r} at G={missing}")
        ax.plot([r["G"] for r in rows], [r[metric] for r in rows], "o-", ms=3, label=label)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("latents kept G")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs G")
    ax.legend(fontsize="small")
    return fig
