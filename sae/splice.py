"""Recaptured LM loss for many reconstructions of the same contexts, with the clean and zero runs done once.

A pruning curve splices dozens of SAEs into the same eval contexts. The scorer runs the clean pass once per eval
set and caches, per batch of contexts, the clean next-token log-probabilities (float32), the site's clean
activation, and the arguments each later decoder layer was called with (attention masks, position embeddings,
position ids, ... captured by forward pre-hooks). For a residual-stream site (`resid_post.L`, `resid_pre.L`) a
reconstruction then costs only the layers after the site, the final norm and the unembedding ("fast" path), and
several reconstructions share one forward, stacked along the batch axis up to `max_batch_tokens`. Sites inside a
layer (`attn_out.L`, `mlp_out.L`), and any model whose tail cannot be rebuilt exactly (checked once against the
clean run), take the full spliced forward instead ("full" path); `scorer.path` says which ran. Position 0 (BOS)
keeps its clean value on both paths, as in `sae.lm.splice_metrics`, the full-forward reference.

Scores follow SAEBench: ce_score = (CE_zero - CE_sae) / (CE_zero - CE_clean), kl_score = (KL_zero - KL_sae) /
KL_zero. Their 95% intervals are a paired percentile bootstrap over contexts: contexts are resampled with
replacement and the clean, zero and spliced per-context means are resampled with the same indices, so the
interval reflects which contexts were drawn, not the model's randomness (see docs/science.md).

Seconds per reconstruction, SmolLM2-135M, resid_post.15, 64 contexts x 64 tokens, CPU float32, 1 thread: fast 6.6, full 10.4.
Batching matters in bf16: on the dev box (AMX, default spec's 64 x 33 splice, 6 reconstructions) the fast path's
rerun of the first batch is bit-exact at batch_size 8 and 64, but the kernels picked for 4, 16 and 32 contexts
round differently (0.004-0.016 nats per context), so at 16 and 32 the check falls back to the full path
(15-16 s against 10 s at 8); batch 64 is not faster on a CPU (12.4 s).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sae.lm import LoadedLM, OutputHead, Replacement, find_output_head, hook_site, parse_site, spliced_logits

DEFAULT_N_BOOT = 1000
LOSS_CHUNK_ELEMS = 1 << 26  # logits elements per loss chunk: bounds the [tokens, vocab] float32 temporaries
_BOOT_CHUNK_ELEMS = 1 << 20  # resampled indices per bootstrap chunk


@dataclass(frozen=True)
class ContextLosses:
    """Mean next-token CE and KL(clean || run) of each context, [N] float64 on the CPU: what bootstraps resample."""

    ce: Tensor
    kl: Tensor


@dataclass
class _Batch:
    """One batch of contexts and what its clean pass left behind."""

    ids: Tensor  # [B, T]
    clean_p: Tensor  # [B, T-1, V] float32 softmax of the clean logits
    clean_negent: Tensor  # [B * (T-1)] float32 sum_v p log p of each token's clean distribution
    clean_ce: Tensor  # [B] float64 per-context mean CE of the clean run
    act: Tensor | None = None  # [B, T, d] the site's clean activation (fast path)
    calls: list[tuple[bool, tuple, dict]] = field(default_factory=list)  # (hidden as kwarg, args[1:], kwargs)


def _is_cache(obj: Any) -> bool:
    return any(c.__name__ == "Cache" for c in type(obj).__mro__)


def _record_call(calls: list, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Pre-hook: keep a layer's call arguments minus its hidden states (a KV cache is dropped: it would grow)."""
    as_kwarg = not args
    kwargs = {k: None if _is_cache(v) else v for k, v in kwargs.items() if k != "hidden_states"}
    calls.append((as_kwarg, tuple(None if _is_cache(a) else a for a in args[1:]), kwargs))


def _tile(obj: Any, batch: int, reps: int) -> Any:
    """Repeat every batch-indexed tensor (leading dim = batch, ndim >= 2) reps times along dim 0, in tuples/dicts."""
    if reps == 1:
        return obj
    if isinstance(obj, Tensor):
        return obj.repeat(reps, *[1] * (obj.ndim - 1)) if obj.ndim >= 2 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_tile(o, batch, reps) for o in obj)
    if isinstance(obj, dict):
        return {k: _tile(v, batch, reps) for k, v in obj.items()}
    return obj


def _scores(ce_sae: Tensor, kl_sae: Tensor, ce_clean: Tensor, ce_zero: Tensor,
            kl_zero: Tensor) -> tuple[Tensor, Tensor]:
    """SAEBench CE and KL scores, elementwise; NaN where the denominator is not positive."""
    nan = torch.full_like(ce_sae, float("nan"))
    gap = ce_zero - ce_clean
    ce = torch.where(gap > 0, (ce_zero - ce_sae) / torch.where(gap > 0, gap, 1.0), nan)
    kl = torch.where(kl_zero > 0, (kl_zero - kl_sae) / torch.where(kl_zero > 0, kl_zero, 1.0), nan)
    return ce, kl


def _resampled_means(columns: Tensor, n_boot: int, seed: int) -> Tensor:
    """[n_boot, C] means of the [N, C] columns over contexts resampled with replacement (same rows for all C)."""
    n = columns.shape[0]
    gen = torch.Generator().manual_seed(seed)
    step = max(1, _BOOT_CHUNK_ELEMS // n)
    out = [columns[torch.randint(n, (min(step, n_boot - s), n), generator=gen)].mean(1)
           for s in range(0, n_boot, step)]
    return torch.cat(out)


def _interval(point: float, samples: Tensor) -> tuple[float, float]:
    """2.5% and 97.5% percentiles of the finite resamples; NaN when the point estimate itself is undefined."""
    if point != point:
        return point, point
    lo, hi = torch.nanquantile(samples, torch.tensor([0.025, 0.975], dtype=samples.dtype)).tolist()
    return lo, hi


def bootstrap_scores(run: ContextLosses, clean: ContextLosses, zero: ContextLosses, *,
                     n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict[str, float]:
    """ce_score and kl_score of a run with 95% percentile-bootstrap bounds over contexts (paired with clean/zero)."""
    cols = torch.stack([run.ce, run.kl, clean.ce, zero.ce, zero.kl], 1)
    point = _scores(*cols.mean(0).unbind())
    boot = _scores(*_resampled_means(cols, n_boot, seed).unbind(1))
    return _with_intervals(("ce_score", "kl_score"), point, boot)


def _with_intervals(names: tuple[str, ...], points: tuple[Tensor, ...], boots: tuple[Tensor, ...]
                    ) -> dict[str, float]:
    """{name: point, name_lo, name_hi} from each point estimate and its bootstrap resamples."""
    out: dict[str, float] = {}
    for name, p, b in zip(names, points, boots, strict=True):
        out[name] = p.item()
        out[f"{name}_lo"], out[f"{name}_hi"] = _interval(out[name], b)
    return out


def paired_bootstrap(a: ContextLosses, b: ContextLosses, clean: ContextLosses, zero: ContextLosses, *,
                     n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict[str, float]:
    """Score difference a - b (ce_score_diff, kl_score_diff) with 95% bounds (`_lo`, `_hi`) from one bootstrap that
    resamples the same contexts for both runs: tighter than comparing two separate intervals."""
    cols = torch.stack([a.ce, a.kl, b.ce, b.kl, clean.ce, zero.ce, zero.kl], 1)

    def diff(m: Tensor) -> tuple[Tensor, Tensor]:
        sa, sb = _scores(m[..., 0], m[..., 1], m[..., 4], m[..., 5], m[..., 6]), \
            _scores(m[..., 2], m[..., 3], m[..., 4], m[..., 5], m[..., 6])
        return sa[0] - sb[0], sa[1] - sb[1]

    return _with_intervals(("ce_score_diff", "kl_score_diff"), diff(cols.mean(0)),
                           diff(_resampled_means(cols, n_boot, seed)))


class SpliceScorer:
    """Scores reconstructions of one site on fixed contexts: `scorer(reconstruct)` -> ce/kl sae means, scores and
    bounds; `score_many` batches several; `paired_difference` compares two. `clean`, `zero` and `last` hold the
    per-context losses of the clean run, the zero-ablation and the last scored reconstruction."""

    def __init__(self, lm: LoadedLM, input_ids: Tensor, site: str, *, batch_size: int = 8,
                 max_batch_tokens: int = 8192, n_boot: int = DEFAULT_N_BOOT, seed: int = 0, fast: bool = True):
        parsed = parse_site(site, lm)
        if input_ids.ndim != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [N, T] with T >= 2, got shape {tuple(input_ids.shape)}")
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens), ("n_boot", n_boot)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.lm, self.site = lm, site
        self.max_batch_tokens, self.n_boot, self.seed = max_batch_tokens, n_boot, seed
        self.path, self.fallback_reason = "full", ""
        self._head: OutputHead | None = None
        self._start = {"resid_post": parsed.layer + 1, "resid_pre": parsed.layer}.get(parsed.kind)
        if not fast:
            self.fallback_reason = "fast path switched off (fast=False)"
        elif self._start is None:
            self.fallback_reason = f"site {site} lies inside a decoder layer"
        else:
            try:
                self._head = find_output_head(lm)
            except ValueError as e:
                self.fallback_reason = str(e)
        ids = input_ids.to(lm.device)
        self._batches = [self._clean_pass(ids[i : i + batch_size]) for i in range(0, ids.shape[0], batch_size)]
        if self._head is not None:
            self._check_fast_path()
        if self.path == "full" and parsed.kind in ("resid_post", "resid_pre") and fast:
            warnings.warn(f"SpliceScorer: full forward per reconstruction at {site}: {self.fallback_reason}",
                          stacklevel=2)
        self.clean = ContextLosses(ce=torch.cat([b.clean_ce for b in self._batches]).cpu(),
                                   kl=torch.zeros(ids.shape[0], dtype=torch.float64))
        self.zero = self._score(["zero"])[0]
        self.last: ContextLosses | None = None
        self.ce_clean, self.ce_zero = self.clean.ce.mean().item(), self.zero.ce.mean().item()
        self.kl_zero = self.zero.kl.mean().item()
        if not self.ce_zero > self.ce_clean:  # the score's denominator: without a gap the ratio means nothing
            warnings.warn(f"zero-ablating {site} does not raise the LM loss (CE {self.ce_zero:.4f} vs clean "
                          f"{self.ce_clean:.4f}): CE scores are NaN at this site", stacklevel=2)

    # --- clean pass and the fast-path check -------------------------------------------------------------------
    @torch.no_grad()
    def _clean_pass(self, ids: Tensor) -> _Batch:
        """Clean log-probs; with a fast path planned, also the site activation and the later layers' call args."""
        acts: list[Tensor] = []
        calls: list[tuple[bool, tuple, dict]] = []
        handles = []
        if self._head is not None:
            handles = [layer.register_forward_pre_hook(lambda m, a, k: _record_call(calls, m, a, k), with_kwargs=True)
                       for layer in self.lm.layers[self._start :]]
        try:
            if self._head is not None:
                with hook_site(self.lm, self.site, acts.append):
                    logits = self.lm.model(input_ids=ids, use_cache=False).logits
            else:
                logits = self.lm.model(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        del logits
        ce = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        p = logp.exp()  # kept instead of logp: each reconstruction's KL is then one dot product per token
        negent = torch.linalg.vecdot(p, logp).reshape(-1)
        return _Batch(ids=ids, clean_p=p, clean_negent=negent, clean_ce=ce.double().mean(1),
                      act=acts[0] if acts else None, calls=calls)

    def _check_fast_path(self) -> None:
        """Two stacked identity splices of the first batch must reproduce the clean run, else use the full path."""
        first = self._batches[0]
        n_later = self.lm.n_layers - self._start
        if first.act is None or any(len(b.calls) != n_later for b in self._batches):
            self._fall_back(f"the capture saw {len(first.calls)} calls of the {n_later} layers after the site")
            return
        try:
            with torch.no_grad():
                runs = self._fast_run(first, [lambda x: x, lambda x: x])
        except (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
            self._fall_back(f"rerunning the later layers failed: {type(e).__name__}: {e}")
            return
        tol = 1e-4 if self.lm.dtype == torch.float32 else 1e-2
        worst = max(max((ce - first.clean_ce).abs().max().item(), kl.abs().max().item()) for ce, kl in runs)
        if not worst <= tol:
            self._fall_back(f"rerunning the later layers does not reproduce the clean run (|dCE| or KL = {worst:.3g})")
            return
        self.path = "fast"

    def _fall_back(self, reason: str) -> None:
        self.path, self.fallback_reason, self._head = "full", reason, None
        for b in self._batches:
            b.act, b.calls = None, []

    # --- per-reconstruction runs ------------------------------------------------------------------------------
    def _losses(self, batch: _Batch, logits_of: Callable[[int, int], Tensor]) -> tuple[Tensor, Tensor]:
        """Per-context mean CE and KL [B] (float64) against the cached clean distribution, in bounded token chunks.

        KL(clean || run) = sum p log p - sum p log q: the first term is cached per token, so a reconstruction costs
        one dot product per token over the vocabulary (no exp, no difference tensor). The fp32 difference of the
        two sums carries an error that grows with the cross-entropy: ~1e-6 nats against a float64 reference on SmolLM2."""
        n_ctx, n_pos, vocab = batch.clean_p.shape
        clean = batch.clean_p.reshape(-1, vocab)
        targets = batch.ids[:, 1:].reshape(-1, 1)
        ce = torch.empty(clean.shape[0], device=clean.device)
        kl = torch.empty_like(ce)
        chunk = max(1, LOSS_CHUNK_ELEMS // vocab)
        for s in range(0, clean.shape[0], chunk):
            e = min(s + chunk, clean.shape[0])
            logp = torch.log_softmax(logits_of(s, e).float(), dim=-1)
            ce[s:e] = -logp.gather(-1, targets[s:e]).squeeze(-1)
            kl[s:e] = (batch.clean_negent[s:e] - torch.linalg.vecdot(clean[s:e], logp)).clamp_min(0.0)
        return ce.view(n_ctx, n_pos).double().mean(1), kl.view(n_ctx, n_pos).double().mean(1)

    def _fast_run(self, batch: _Batch, reps: Sequence[Replacement]) -> list[tuple[Tensor, Tensor]]:
        """Splice len(reps) reconstructions stacked along the batch axis and run only the layers after the site."""
        assert batch.act is not None and self._head is not None
        x = batch.act
        n_ctx, n_tok, d = x.shape
        h = x.repeat(len(reps), 1, 1)
        for r, rep in enumerate(reps):
            rows = h[r * n_ctx : (r + 1) * n_ctx]
            if rep == "zero":
                rows[:, 1:] = 0
            else:
                rec = rep(x[:, 1:].reshape(-1, d).float())
                rows[:, 1:] = rec.reshape(n_ctx, n_tok - 1, d).to(device=x.device, dtype=x.dtype)
        for layer, (as_kwarg, args, kwargs) in zip(self.lm.layers[self._start :], batch.calls, strict=True):
            args, kwargs = _tile(args, n_ctx, len(reps)), _tile(kwargs, n_ctx, len(reps))
            out = layer(*args, hidden_states=h, **kwargs) if as_kwarg else layer(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        normed = self._head.norm(h[:, :-1])
        results = []
        for r in range(len(reps)):
            flat = normed[r * n_ctx : (r + 1) * n_ctx].reshape(-1, d)
            results.append(self._losses(batch, lambda s, e, flat=flat: self._head.logits(flat[s:e])))
        return results

    def _full_run(self, batch: _Batch, rep: Replacement) -> tuple[Tensor, Tensor]:
        logits = spliced_logits(self.lm, batch.ids, self.site, rep)[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1])
        return self._losses(batch, lambda s, e: flat[s:e])

    @torch.no_grad()
    def _score(self, reps: Sequence[Replacement]) -> list[ContextLosses]:
        for i, rep in enumerate(reps):
            if rep != "zero" and (isinstance(rep, str) or not callable(rep)):
                raise ValueError(f"reconstructs[{i}] must be a callable [N, d] -> [N, d] (or 'zero'), got {rep!r}")
        ce: list[list[Tensor]] = [[] for _ in reps]
        kl: list[list[Tensor]] = [[] for _ in reps]
        for batch in self._batches:
            if self.path == "fast":
                group = max(1, self.max_batch_tokens // batch.ids.numel())
                runs = [run for g in range(0, len(reps), group) for run in self._fast_run(batch, reps[g : g + group])]
            else:
                runs = [self._full_run(batch, rep) for rep in reps]
            for i, (c, k) in enumerate(runs):
                ce[i].append(c.cpu())
                kl[i].append(k.cpu())
        return [ContextLosses(ce=torch.cat(c), kl=torch.cat(k)) for c, k in zip(ce, kl, strict=True)]

    # --- public API -------------------------------------------------------------------------------------------
    def per_context(self, reconstruct: Callable[[Tensor], Tensor]) -> ContextLosses:
        """Per-context mean CE/KL of one reconstruction (also kept as `last`)."""
        self.last = self._score([reconstruct])[0]
        return self.last

    def result(self, run: ContextLosses) -> dict[str, float]:
        """Means, scores and 95% bootstrap bounds of a run's per-context losses."""
        return {"ce_sae": run.ce.mean().item(), "kl_sae": run.kl.mean().item(),
                **bootstrap_scores(run, self.clean, self.zero, n_boot=self.n_boot, seed=self.seed)}

    def score_many(self, reconstructs: Sequence[Callable[[Tensor], Tensor]]) -> list[dict[str, float]]:
        """The same numbers as one call per reconstruction, several stacked per forward on the fast path."""
        runs = self._score(list(reconstructs))
        if runs:
            self.last = runs[-1]
        return [self.result(run) for run in runs]

    def __call__(self, reconstruct: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """ce_sae, kl_sae, ce_score, kl_score and ce_score_lo/hi, kl_score_lo/hi (95% bootstrap over contexts)."""
        return self.score_many([reconstruct])[0]

    def paired_difference(self, rec_a: Callable[[Tensor], Tensor],
                          rec_b: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Score of a minus score of b with paired bootstrap bounds: ce_score_diff(_lo/_hi), kl_score_diff(_lo/_hi)."""
        a, b = self._score([rec_a, rec_b])
        return paired_bootstrap(a, b, self.clean, self.zero, n_boot=self.n_boot, seed=self.seed)
