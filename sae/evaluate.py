"""Everything measured on held-out tokens after training: the progressive-code evaluation of one SAE.

The protocol (docs/science.md, "Evaluation protocol"):
- Latents are ranked on TRAINING activations (`ranking`, a `LatentStats` from a fixed train sample) and every
  reduced SAE is scored on the held-out eval tokens, so no token both orders and judges a latent.
- A vanilla SAE is reduced three ways: by E[z^2] (`prune_ez2`), by firing frequency (`prune_freq`) and by seeded
  random subsets (`prune_random`, mean and sd over `random_draws` draws). A Matryoshka SAE is cut at its own
  trained group boundaries (`prefix`; inside a group the order is arbitrary, so no other G) and also pruned by
  E[z^2].
- Every reduced SAE is scored under each rule of `opts.rules` (default both of `sae.prune.RULES`: `masked`, the
  full top-k restricted to the kept latents; `reselect`, top-k among the kept latents), each with its L0.
- FVU, MSE, L0 and dead latents use all eval tokens, for every method and rule (they cost one sparse decode).
  The costlier measures are computed for the `report_methods` (default: the SAE's own progressive code, the
  one the frontier and the report compare): RSA on a seeded sample of `rsa_tokens` tokens, linear CKA on all
  eval tokens (d x d Gram form), the interpretability proxies (masked rule), and, for `splice_rules`, the
  recaptured LM loss and KL with bootstrap intervals over contexts (the LM forward is the expensive part).
- The proxies (`proxy/...`) also for the whole SAE and each Matryoshka group.
Curves come back as {"<metric>/<method>.<rule>": [[G, value], ...]}, the layout the tracker logs as MLflow
histories with step = G. One pass over the eval set encodes each batch once and scores every reduced SAE from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from sae.importance import LatentStats, PowerLawFit, decoder_spectrum, fit_power_law
from sae.interp import concat_codes, firing_frequency, group_latents, proxy_report, token_concentration
from sae.metrics import (
    BatchMoments,
    ReconstructionAccumulator,
    RSAReference,
    batch_moments,
    linear_cka_from_grams,
)
from sae.model import evaluating, sparse_decode
from sae.prune import (
    RULES,
    check_nested,
    nested_masked_residuals,
    nested_reselect_codes,
    order_latents,
    reduced_code,
)
from sae.train import to_device

CURVE_METHODS = ("prefix", "prune_ez2", "prune_freq", "prune_random")
EVAL_BATCH_TOKENS = 4096  # tokens per evaluation batch: what a GPU holds of the eval set at once
PRIMARY_RULE = "masked"
MONOTONE_TOLERANCE = 0.01  # a progressive code's masked FVU may rise by at most 1% from one G to the next
# scorer(reconstruct) -> dict with ce_score, kl_score and their _lo/_hi bounds; see sae.splice.SpliceScorer
Scorer = Callable[[Callable[[Tensor], Tensor]], dict[str, float]]


def curve_key(metric: str, method: str, rule: str) -> str:
    """`fvu/prefix.masked`: the rule is part of every curve's name, so MLflow shows which rule scored it.

    (A dot, not '@': MLflow metric names allow only letters, digits, '_', '-', '.', '/', ':' and spaces.)
    """
    return f"{metric}/{method}.{rule}"


def split_curve_key(key: str) -> tuple[str, str, str] | None:
    """(metric, method, rule) of a curve key, or None for a key that is not a reduced-SAE curve."""
    metric, _, tail = key.rpartition("/")
    method, dot, rule = tail.rpartition(".")
    return (metric, method, rule) if metric and dot and method and rule in RULES else None


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
    batch_size: int = EVAL_BATCH_TOKENS

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


Rule = Literal["masked", "reselect"]
Method = Literal["prefix", "prune_ez2", "prune_freq", "prune_random"]


class EvalSettings(BaseModel):
    """How reduced SAEs are scored (docs/science.md, "Evaluation protocol"); defaults are the protocol's minimums.
    A sweep spec's `eval:` section composes this model, so each default and constraint lives here once."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rules: tuple[Rule, ...] = Field(RULES, min_length=1, strict=False,
                                    description="scoring rules of every reduced SAE (masked, reselect)")
    random_draws: int = Field(5, ge=1, le=1000, description="seeded random subsets per G (mean and sd are logged)")
    report_methods: tuple[Method, ...] | None = Field(
        None, strict=False, description="methods that also get RSA, CKA, proxies and the LM splice; null: each "
                                        "SAE's own progressive code (prefix for Matryoshka, prune_ez2 for vanilla)")
    splice_rules: tuple[Rule, ...] = Field((PRIMARY_RULE,), strict=False,
                                           description="rules whose reduced SAEs the LM splice scores")
    rsa_tokens: int = Field(2048, ge=16, le=16384, description="RSA compares all pairs: O(n^2) memory")
    probe_features: int = Field(8, ge=1, le=4096, description="latents each sparse probe may use")
    probe_candidates: int = Field(64, ge=1, le=1 << 20, description="candidate latents per probe, the same for "
                                                                    "every group")
    concentration_top: int = Field(32, ge=2, le=10**6, description="top activations per latent for token "
                                                                   "concentration")
    random_seed: int = Field(0, description="seeds the random subsets, the RSA sample and the probes")

    @model_validator(mode="after")
    def _splice_rules_are_scored(self) -> EvalSettings:
        missing = [r for r in self.splice_rules if r not in self.rules]
        if missing:
            raise ValueError(f"splice_rules {list(missing)} must also be in rules {list(self.rules)}; add them there")
        return self


class EvalOptions(EvalSettings):
    """One evaluation: the settings plus the G every curve is scored at."""

    granularities: tuple[int, ...] = Field(strict=False, description="the G of every curve")

    @classmethod
    def for_run(cls, settings: EvalSettings, granularities: Sequence[int]) -> EvalOptions:
        """An evaluation of `settings` (e.g. a sweep spec's `eval:` section, which holds more than the settings)."""
        return cls(**{name: getattr(settings, name) for name in EvalSettings.model_fields},
                   granularities=tuple(granularities))

    def detailed_methods(self, is_matryoshka: bool) -> tuple[str, ...]:
        """Methods that get RSA, CKA, proxies and the LM splice."""
        return tuple(self.report_methods) if self.report_methods is not None else (principal_method(is_matryoshka),)


@dataclass
class EvalReport:
    final: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    power_law: dict = field(default_factory=dict)
    importance: Tensor | None = None
    fit: PowerLawFit | None = None

    def add(self, metric: str, method: str, rule: str, g: int, value: float) -> None:
        if isinstance(value, int | float) and not math.isnan(value):
            self.curves.setdefault(curve_key(metric, method, rule), []).append([g, float(value)])

    def curve_rows(self, metric: str, rule: str = PRIMARY_RULE) -> dict[str, list[dict[str, float]]]:
        """{method: [{"G": g, metric: value}, ...]} for one rule: the layout sae.plots.plot_pruning_curves draws."""
        out: dict[str, list[dict[str, float]]] = {}
        for key, pts in self.curves.items():
            parts = split_curve_key(key)
            if parts and parts[0] == metric and parts[2] == rule:
                out[parts[1]] = [{"G": g, metric: v} for g, v in sorted(pts)]
        return out

    def at(self, metric: str, method: str, g: int, rule: str = PRIMARY_RULE) -> float:
        return next((v for gg, v in self.curves.get(curve_key(metric, method, rule), []) if gg == g), float("nan"))


def principal_method(is_matryoshka: bool) -> str:
    """How an SAE yields its progressive code: a Matryoshka SAE's own prefixes, a vanilla SAE pruned by E[z^2]."""
    return "prefix" if is_matryoshka else "prune_ez2"


@dataclass
class _Reduced:
    """One reduced SAE: `method` keeps latents `kept` (G of them), scored by `rule`; `draw` numbers random subsets.
    `kept` = None stands for the full SAE."""

    method: str
    g: int
    rule: str
    kept: Tensor | None
    draw: int = 0
    mask: Tensor | None = None
    acc: ReconstructionAccumulator = field(default_factory=ReconstructionAccumulator)
    fires: Tensor | None = None  # [n] how many eval tokens each latent fired on (long)
    grams: list[Tensor] | None = None  # [x_hat^T x_hat, x_hat^T x, sum x_hat] for CKA, when asked
    metrics: dict[str, float] = field(default_factory=dict)


def reduced_saes(sae, ranking: LatentStats, opts: EvalOptions) -> list[_Reduced]:
    """Every (method, G, rule[, draw]) to score, G < n only (at G = n every method is the full SAE)."""
    n = sae.cfg.n_latents
    gs = sorted({g for g in opts.granularities if 2 <= g < n})
    orders: dict[str, list[Tensor]] = {}
    if sae.cfg.is_matryoshka:
        boundaries = set(sae.cfg.partition)
        gs_prefix = [g for g in gs if g in boundaries]
        orders["prefix"] = [order_latents(n, "prefix")]
        orders["prune_ez2"] = [order_latents(ranking, "ez2")]
    else:
        gs_prefix = []
        orders["prune_ez2"] = [order_latents(ranking, "ez2")]
        orders["prune_freq"] = [order_latents(ranking, "freq")]
        orders["prune_random"] = [order_latents(n, "random", seed=opts.random_seed + d) for d in range(opts.random_draws)]
    out = []
    device = sae.W_enc.device
    for method, draws in orders.items():
        for g in (gs_prefix if method == "prefix" else gs):
            for rule in opts.rules:
                for d, order in enumerate(draws):
                    kept = order[:g].to(device)
                    mask = torch.zeros(n, dtype=torch.bool, device=device)
                    mask[kept] = True
                    out.append(_Reduced(method, g, rule, kept, d, mask, fires=_no_fires(n, device)))
    return out


def _no_fires(n: int, device: torch.device) -> Tensor:
    return torch.zeros(n, dtype=torch.long, device=device)


def _code(sae, r: _Reduced | None, pre: Tensor, vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    if r is None or r.kept is None:  # the full SAE
        return vals, idx
    return reduced_code(sae, pre, vals, idx, r.kept, r.rule, r.mask)


def _nested_curves(reduced: list[_Reduced], rule: str) -> list[list[_Reduced]]:
    """The items of `rule` grouped by (method, draw), smallest G first: their kept sets are prefixes of one order,
    so one pass scores a whole curve (`nested_reselect_codes`, `nested_masked_residuals`)."""
    curves: dict[tuple[str, int], list[_Reduced]] = {}
    for r in reduced:
        if r.rule == rule:
            curves.setdefault((r.method, r.draw), []).append(r)
    return [sorted(c, key=lambda r: r.g) for c in curves.values()]


def _reselect_curves(sae, reduced: list[_Reduced]) -> list[list[_Reduced]]:
    """The `reselect` curves of a TopK SAE (BatchTopK's reselect code is per item: its threshold)."""
    return _nested_curves(reduced, "reselect") if sae.cfg.architecture == "topk" else []


def _encode_full(sae, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _, pre = sae.pre_activations(sae.normalise(x))
    vals, idx = sae.select(pre)
    return pre, vals, idx


def _reconstructor(sae, r: _Reduced | None) -> Callable[[Tensor], Tensor]:
    """Raw activations -> the reduced SAE's raw reconstruction (what the LM splice replaces the site with)."""
    device = sae.W_enc.device

    def reconstruct(a: Tensor) -> Tensor:
        x = a.to(device)
        pre, vals, idx = _encode_full(sae, x)
        return sae.decode(*_code(sae, r, pre, vals, idx)).to(a.dtype)

    return reconstruct


class _Batch(NamedTuple):
    """One eval batch's side of every reconstruction's metrics."""

    xc_n: Tensor  # the normalised x minus b_dec: the SAE's own units
    xc: Tensor  # the raw x minus the eval mean (CKA's centring shift)
    moments: BatchMoments
    shift: Tensor
    to_raw: float  # 1 / input_scale
    b_dec: Tensor

    def account(self, r: _Reduced, v: Tensor, i: Tensor, residual: Tensor) -> None:
        """Add this batch to r's metrics, from its code (v, i) and its residual x - x_hat in the SAE's units."""
        r.acc.update_residual(residual, v, moments=self.moments, to_raw=self.to_raw)
        if r.rule != "masked":  # a masked code fires where the full one does, on its kept latents (_score_all)
            r.fires.index_add_(0, i.reshape(-1), (v > 0).reshape(-1).long())  # fixed shapes: no host read
        if r.grams is not None:
            xhc = (self.xc_n - residual + self.b_dec) * self.to_raw - self.shift
            r.grams[0] += (xhc.T @ xhc).double()
            r.grams[1] += (xhc.T @ self.xc).double()
            r.grams[2] += xhc.sum(0).double()


@torch.no_grad()
def _score_all(sae, data: EvalData, reduced: list[_Reduced], opts: EvalOptions
               ) -> tuple[dict[str, float], tuple[Tensor, Tensor]]:
    """One pass over the eval set: FVU, MSE, L0, dead for the full SAE and every reduced SAE, CKA and RSA for the
    full SAE and the detailed methods (`EvalOptions.detailed_methods`). Also returns the full SAE's code of every
    eval token (values, indices on the CPU), which the proxies read instead of encoding the eval set again."""
    device = sae.W_enc.device
    n, d = sae.cfg.n_latents, sae.cfg.d_in
    to_raw = 1.0 / sae.cfg.input_scale
    detailed = opts.detailed_methods(sae.cfg.is_matryoshka)
    full = _Reduced("full", n, "-", None, fires=_no_fires(n, device))
    # CKA's sums are taken about the eval mean: they stay of the order of the covariance, so float32 matmuls lose
    # nothing to cancellation (CKA centres exactly, whatever the shift) and cost a fraction of float64 ones
    shift = sum(chunk.sum(0, dtype=torch.float64) for chunk in data.batches()) / data.acts.shape[0]
    shift = shift.to(device=device, dtype=torch.float32)  # summed in chunks: no float64 copy of the eval set
    gram_x = torch.zeros(d, d, dtype=torch.float64, device=device)
    sum_x = torch.zeros(d, dtype=torch.float64, device=device)
    items = [full, *reduced]
    reselect, masked = _reselect_curves(sae, reduced), _nested_curves(reduced, "masked")
    for curve in (*reselect, *masked):
        check_nested([r.kept for r in curve])  # once here, not per batch (on a GPU each check is a host sync)
    for r in items:
        if r is full or r.method in detailed:
            r.grams = [torch.zeros(d, d, dtype=torch.float64, device=device),
                       torch.zeros(d, d, dtype=torch.float64, device=device),
                       torch.zeros(d, dtype=torch.float64, device=device)]
    all_vals, all_idx = [], []
    for x in data.batches():
        x = to_device(x, device).float()
        xc_n, pre = sae.pre_activations(sae.normalise(x))  # xc_n: normalised x minus b_dec
        vals, idx = sae.select(pre)
        all_vals.append(vals.float().cpu())
        all_idx.append(idx.cpu())
        moments = batch_moments(x)  # x's side of every reconstruction metric, once per batch
        xc = x - shift
        gram_x += (xc.T @ xc).double()
        sum_x += xc.sum(0).double()  # float32 sums of centred values (cascade summation): ~1e-7 relative
        batch = _Batch(xc_n, xc, moments, shift, to_raw, sae.b_dec)
        full_residual = xc_n - sparse_decode(vals, idx, sae.W_dec)
        batch.account(full, vals, idx, full_residual)
        for curve in masked:
            residuals = nested_masked_residuals(sae.W_dec, full_residual, vals, idx, [r.kept for r in curve], n,
                                                check=False)
            for r, residual in zip(curve, residuals, strict=True):
                batch.account(r, *_code(sae, r, pre, vals, idx), residual)
        codes = {id(r): code for curve in reselect
                 for r, code in zip(curve, nested_reselect_codes(sae, pre, [r.kept for r in curve], vals.dtype,
                                                                  check=False), strict=True)}
        for r in reduced:
            if r.rule != "masked":
                v, i = codes[id(r)] if id(r) in codes else _code(sae, r, pre, vals, idx)
                batch.account(r, v, i, xc_n - sparse_decode(v, i, sae.W_dec))
    n_tok = data.acts.shape[0]
    sample = _sample(n_tok, opts.rsa_tokens, opts.random_seed)
    x_s = data.acts[sample].to(device).float()
    pre_s, vals_s, idx_s = _encode_full(sae, x_s)
    rsa = RSAReference(x_s, n_tokens=opts.rsa_tokens, seed=opts.random_seed)  # x's distances ranked once, not per SAE
    for r in items:
        if r.rule == "masked" and r.mask is not None:
            r.fires = torch.where(r.mask, full.fires, 0)
        m = r.acc.result()
        del m["tokens"]
        m["dead_fraction"] = 1.0 - float((r.fires > 0).sum()) / r.g
        if r.grams is not None:  # the detailed methods: similarity too
            x_hat_s = sae.decode(*_code(sae, r, pre_s, vals_s, idx_s)).float()
            m["rsa"] = rsa(x_hat_s)
            m["cka"] = linear_cka_from_grams(gram_x, sum_x, r.grams[0], r.grams[1], r.grams[2], n_tok)
            r.grams = None
        r.metrics = m
    return full.metrics, concat_codes(all_vals, all_idx)


def _splice(sae, reduced: list[_Reduced], opts: EvalOptions, scorer: Scorer, full: dict[str, float],
            progress: Callable[[str], None] | None) -> None:
    """CE/KL scores (with context-bootstrap bounds) for the full SAE and the reduced SAEs that need them."""
    detailed = opts.detailed_methods(sae.cfg.is_matryoshka)
    chosen = [r for r in reduced if r.method in detailed and r.rule in opts.splice_rules]
    targets: list[_Reduced | None] = [None, *chosen]
    recons = [_reconstructor(sae, r) for r in targets]
    many = getattr(scorer, "score_many", None)
    results = many(recons) if many is not None else [scorer(f) for f in recons]
    for r, s in zip(targets, results, strict=True):
        keep = {k: v for k, v in s.items() if k.startswith(("ce_score", "kl_score"))}
        (full if r is None else r.metrics).update(keep)
    if progress:
        progress(f"spliced {len(targets)} reconstructions into the LM")


def _proxies(sae, data: EvalData, reduced: list[_Reduced], opts: EvalOptions, report: EvalReport,
             codes: tuple[Tensor, Tensor]) -> None:
    """Interpretability proxies of masked reduced SAEs (their codes are the full code restricted to the kept
    latents) and of each Matryoshka group, all from the full SAE's code of the eval set (`codes`)."""
    vals, idx = codes
    n = sae.cfg.n_latents
    detailed = opts.detailed_methods(sae.cfg.is_matryoshka)
    freq = firing_frequency(vals, idx, n)
    conc = token_concentration(vals, idx, data.token_ids, n, top=opts.concentration_top, min_activations=5)

    def proxy(latents: Tensor) -> dict[str, float]:
        return proxy_report(vals, idx, data.token_ids, n, latents=latents.cpu(), freq=freq, labels=data.labels,
                            doc_ids=data.doc_ids, top=opts.concentration_top, k_features=opts.probe_features,
                            candidates=opts.probe_candidates, random_draws=opts.random_draws, seed=opts.random_seed,
                            conc=conc)

    for r in reduced:
        if r.rule == PRIMARY_RULE and r.method in detailed and r.method != "prune_random":  # no draw means
            for key, value in proxy(r.kept).items():
                report.add(f"proxy/{key}", r.method, r.rule, r.g, value)
    for key, value in proxy(torch.arange(n)).items():
        report.final[f"proxy/{key}"] = value
    if sae.cfg.is_matryoshka:
        for i, latents in enumerate(group_latents(sae.cfg.partition)):
            for key, value in proxy(latents).items():
                report.final[f"proxy/group{i}/{key}"] = value


def _log_curves(sae, reduced: list[_Reduced], full: dict[str, float], report: EvalReport) -> None:
    """Curves per (method, rule); random draws become their mean (`<metric>`) and sd (`<metric>_std`)."""
    groups: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for r in reduced:
        groups.setdefault((r.method, r.g, r.rule), []).append(r.metrics)
    for (method, g, rule), runs in groups.items():
        for metric in runs[0]:
            values = torch.tensor([m[metric] for m in runs if metric in m], dtype=torch.float64)
            report.add(metric, method, rule, g, float(values.mean()))
            if len(runs) > 1:
                report.add(f"{metric}_std", method, rule, g, float(values.std(correction=1)))
    n = sae.cfg.n_latents
    principal = principal_method(sae.cfg.is_matryoshka)
    metrics_of: dict[tuple[str, str], set[str]] = {}
    for r in reduced:
        metrics_of.setdefault((r.method, r.rule), set()).update(r.metrics)
    for rule in {r.rule for r in reduced} or {PRIMARY_RULE}:
        metrics_of.setdefault((principal, rule), set(full))
    for (method, rule), names in metrics_of.items():  # G = n: every method keeps the whole dictionary
        for metric in names & set(full):
            report.add(metric, method, rule, n, full[metric])


def monotone_fvu(report: EvalReport, method: str, tolerance: float = MONOTONE_TOLERANCE) -> bool | None:
    """True if the masked FVU of `method` never rises (beyond `tolerance`, relative) as G grows; None when the
    curve has fewer than two points, so nothing was checked.

    A progressive code that fails this is undertrained (its outer latents hurt): docs/science.md says why a
    comparison involving it is not a verdict.
    """
    pts = sorted(report.curves.get(curve_key("fvu", method, PRIMARY_RULE), []))
    if len(pts) < 2:
        return None
    return all(b <= a * (1 + tolerance) for (_, a), (_, b) in zip(pts, pts[1:], strict=False))


def _spectrum(sae, ranking: LatentStats, report: EvalReport) -> None:
    """The decoder spectrum has one value per eigen-direction, not per latent: logged as its own curves (positive
    eigenvalues), and the usage-weighted one fitted like importance."""
    usage = ranking.mean_sq if float(ranking.mean_sq.sum()) > 0 else None
    spectra = {"eigenvalue": decoder_spectrum(sae, weights=usage), "eigenvalue_unweighted": decoder_spectrum(sae)}
    for name, eig in spectra.items():
        report.curves[f"spectrum/{name}"] = [[r + 1, float(v)] for r, v in enumerate(eig.tolist()) if v > 0]
    try:
        weighted = spectra["eigenvalue"]
        fit = fit_power_law(weighted[weighted > 0])
    except ValueError:
        return
    report.final.update({f"spectrum_fit/{k}": float(v) for k, v in fit.as_dict().items() if _numeric(v)})


def _numeric(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _sample(n: int, m: int, seed: int) -> Tensor:
    if n <= m:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values


@torch.no_grad()
def evaluate_progressive(sae, data: EvalData, opts: EvalOptions, scorer: Scorer | None = None, *,
                         ranking: LatentStats, progress: Callable[[str], None] | None = None) -> EvalReport:
    """Importance, power law and every reduced-SAE curve of one trained SAE (see the module docstring).

    ranking: latent statistics measured on training activations (`latent_stats(sae, train_sample)`), which
    order the latents; the eval data only scores them.
    """
    if ranking.n_latents != sae.cfg.n_latents:
        raise ValueError(f"ranking has {ranking.n_latents} latents but the SAE has {sae.cfg.n_latents}")
    with evaluating(sae):
        report = EvalReport(importance=ranking.mean_sq.cpu())
        try:
            fit = fit_power_law(ranking.mean_sq, freq=ranking.freq, tokens=ranking.tokens)
        except ValueError as err:  # too few live, well-sampled latents in the window: say so, score the rest
            report.power_law = {"error": str(err)}
            if progress:
                progress(f"no power-law fit: {err}")
        else:
            report.fit, report.power_law = fit, fit.as_dict()
            report.final.update({f"power_law/{k}": float(v) for k, v in report.power_law.items() if _numeric(v)})
        reduced = reduced_saes(sae, ranking, opts)
        full, codes = _score_all(sae, data, reduced, opts)
        if progress:
            progress(f"scored {len(reduced)} reduced SAEs ({', '.join(opts.rules)}): full fvu={full['fvu']:.4f}")
        if scorer is not None:
            _splice(sae, reduced, opts, scorer, full, progress)
        report.final.update(full)
        _log_curves(sae, reduced, full, report)
        _proxies(sae, data, reduced, opts, report, codes)
        _spectrum(sae, ranking, report)
        monotone = monotone_fvu(report, principal_method(sae.cfg.is_matryoshka))
        report.final["monotone_fvu"] = float("nan") if monotone is None else float(monotone)
        if progress:
            pts = report.curve_rows("fvu").get(principal_method(sae.cfg.is_matryoshka), [])
            progress("masked fvu by G: " + ", ".join(f"{int(p['G'])}:{p['fvu']:.4f}" for p in pts))
        return report
