"""Everything measured on held-out tokens after training: the progressive-code evaluation of one SAE.

For a vanilla SAE the dictionary is ordered three ways (E[z^2], frequency, a seeded random subset) and pruned to
each granularity G; a Matryoshka SAE is cut at its own prefixes and, for comparison, also pruned by E[z^2]. At
every G the pruned SAE is an ordinary SAE, scored on FVU, MSE, L0 and dead latents (all eval tokens), RSA and
CKA (a token sample), the recaptured LM loss and KL scores (spliced into the LM on a fixed set of contexts),
and the two interpretability proxies (topic probing, token concentration). Curves come back as
{"<metric>/<method>": [[G, value], ...]}, the layout the tracker logs as MLflow histories with step = G.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sae.importance import PowerLawFit, fit_power_law, latent_stats
from sae.interp import encode_all, group_latents, interpretability_report
from sae.metrics import ReconstructionAccumulator, dead_fraction, linear_cka, rsa
from sae.prune import order_latents, prefix_sae, prune_sae

CURVE_METHODS = ("prune_ez2", "prune_freq", "prune_random", "prefix")
# scorer(reconstruct) -> dict with ce_score and kl_score; see sae.lm.SpliceScorer
Scorer = Callable[[Callable[[Tensor], Tensor]], dict[str, float]]


@dataclass
class EvalData:
    """Held-out tokens: activations [N, d] with their token ids, context ids, document ids and labels.

    The topic probe pools tokens per document (a label is constant within a document, not within a context).
    """

    acts: Tensor
    token_ids: Tensor
    context_ids: Tensor
    doc_ids: Tensor
    labels: list[str] | None = None
    batch_size: int = 4096

    def __post_init__(self) -> None:
        n = self.acts.shape[0]
        if n == 0:
            raise ValueError("EvalData.acts is empty: the eval split produced no tokens")
        for name in ("token_ids", "context_ids", "doc_ids"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"EvalData.{name} must have one entry per token ({n})")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"EvalData.labels must have one entry per token ({n})")

    def batches(self) -> list[Tensor]:
        return list(self.acts.split(self.batch_size))


@dataclass
class EvalOptions:
    granularities: Sequence[int]
    rsa_tokens: int = 512
    probe_features: int = 8
    concentration_top: int = 32
    seed: int = 0


@dataclass
class EvalReport:
    final: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    power_law: dict = field(default_factory=dict)
    importance: Tensor | None = None
    fit: PowerLawFit | None = None

    def curve_rows(self, metric: str) -> dict[str, list[dict[str, float]]]:
        """{method: [{"G": g, metric: value}, ...]}: the layout sae.plots.plot_pruning_curves draws."""
        prefix = f"{metric}/"
        return {key.removeprefix(prefix): [{"G": g, metric: v} for g, v in pts]
                for key, pts in self.curves.items() if key.startswith(prefix)}

    def at(self, metric: str, method: str, g: int) -> float:
        return next((v for gg, v in self.curves.get(f"{metric}/{method}", []) if gg == g), float("nan"))


def principal_method(is_matryoshka: bool) -> str:
    """How an SAE yields its progressive code: a Matryoshka SAE's own prefixes, a vanilla SAE pruned by E[z^2]."""
    return "prefix" if is_matryoshka else "prune_ez2"


def methods_for(sae) -> dict[str, str]:
    """Curve name -> latent ordering measure, for this kind of SAE."""
    if sae.cfg.is_matryoshka:
        return {"prefix": "prefix", "prune_ez2": "ez2"}
    return {"prune_ez2": "ez2", "prune_freq": "freq", "prune_random": "random"}


@torch.no_grad()
def score_sae(sae, data: EvalData, opts: EvalOptions, scorer: Scorer | None) -> dict[str, float]:
    """All per-granularity metrics of one (possibly pruned) SAE."""
    was_training = sae.training
    sae.eval()
    try:
        device = sae.W_enc.device
        acc = ReconstructionAccumulator()
        fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=device)
        vals_all, idx_all = encode_all(sae, data.batches())
        for x, v, i in zip(data.batches(), vals_all.split(data.batch_size), idx_all.split(data.batch_size), strict=True):
            v, i = v.to(device), i.to(device)
            acc.update(x.to(device), sae.decode(v, i), v)
            fired[i[v > 0]] = True
        out = acc.result()
        out["dead_fraction"] = dead_fraction(fired.float())
        sample = _sample(data.acts.shape[0], opts.rsa_tokens, opts.seed)
        x_s = data.acts[sample].to(device)
        x_hat_s = sae(x_s)
        out["rsa"] = rsa(x_s, x_hat_s, n_tokens=opts.rsa_tokens, seed=opts.seed)
        out["cka"] = linear_cka(x_s, x_hat_s)
        if scorer is not None:
            s = scorer(lambda a: sae(a.to(device)).to(a.dtype))
            out["ce_score"], out["kl_score"] = s["ce_score"], s["kl_score"]
        interp = _interpretability(vals_all, idx_all, data, sae.cfg.n_latents, torch.arange(sae.cfg.n_latents), opts)
        out["token_conc"] = interp["token_concentration_mean"]
        if "probe_accuracy" in interp:
            out["probe_acc"], out["probe_lift"] = interp["probe_accuracy"], interp["probe_lift"]
        return out
    finally:
        sae.train(was_training)


def _interpretability(vals: Tensor, idx: Tensor, data: EvalData, n_latents: int, latents: Tensor,
                      opts: EvalOptions) -> dict[str, float]:
    """Token concentration always; the topic probe (pooled per document) when the data are labelled and hold
    enough documents of at least two topics to split into train and test halves."""
    kwargs = dict(latents=latents, top=opts.concentration_top, k_features=opts.probe_features, seed=opts.seed)
    if data.labels is not None:
        try:
            return interpretability_report(vals, idx, data.token_ids, n_latents, labels=data.labels,
                                           context_ids=data.doc_ids, **kwargs)
        except ValueError as err:
            if "too few examples" not in str(err) and "single class" not in str(err):
                raise
    return interpretability_report(vals, idx, data.token_ids, n_latents, **kwargs)


def _sample(n: int, m: int, seed: int) -> Tensor:
    if n <= m:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values


@torch.no_grad()
def evaluate_progressive(sae, data: EvalData, opts: EvalOptions, scorer: Scorer | None = None,
                         progress: Callable[[str], None] | None = None) -> EvalReport:
    """Importance, power law and every pruning / prefix curve of one trained SAE."""
    report = EvalReport()
    stats = latent_stats(sae, data.batches())
    fit = fit_power_law(stats.mean_sq)
    report.importance = stats.mean_sq.cpu()
    report.fit = fit
    report.power_law = fit.as_dict()
    full = score_sae(sae, data, opts, scorer)
    report.final.update(full)
    report.final.update({f"power_law/{k}": v for k, v in fit.as_dict().items() if isinstance(v, int | float)})
    report.final["power_law/prefers_power_law"] = float(fit.preferred == "power_law")
    n = sae.cfg.n_latents
    gs = [g for g in opts.granularities if 2 <= g <= n]
    for method, measure in methods_for(sae).items():
        order = order_latents(stats if measure in ("ez2", "freq") else n, measure, seed=opts.seed)
        for g in gs:
            # at G = n every ordering keeps the whole dictionary: the full SAE itself
            sub = sae if g == n else (prefix_sae(sae, g) if measure == "prefix" else prune_sae(sae, order[:g]))
            metrics = full if sub is sae else score_sae(sub, data, opts, scorer)
            for key, value in metrics.items():
                if isinstance(value, float) and not math.isnan(value):
                    report.curves.setdefault(f"{key}/{method}", []).append([g, value])
            if progress:
                progress(f"{method} G={g}: fvu={metrics['fvu']:.4f}")
    if sae.cfg.is_matryoshka:
        _group_interpretability(sae, data, opts, report)
    return report


def _group_interpretability(sae, data: EvalData, opts: EvalOptions, report: EvalReport) -> None:
    """Claim 4: token concentration (and probing) of each Matryoshka group, innermost first."""
    vals, idx = encode_all(sae, data.batches())
    for i, latents in enumerate(group_latents(sae.cfg.partition)):
        r = _interpretability(vals, idx, data, sae.cfg.n_latents, latents, opts)
        report.final[f"group{i}/token_conc"] = r["token_concentration_mean"]
        if "probe_accuracy" in r:
            report.final[f"group{i}/probe_acc"] = r["probe_accuracy"]
