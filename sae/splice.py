"""Recaptured LM loss for many reconstructions of the same contexts, with the clean and zero runs done once.

A pruning curve splices dozens of SAEs into the same eval contexts. This scorer runs the clean and
zero-ablated passes once (clean logits cached per batch), so each further SAE costs exactly one spliced forward. Scores follow SAEBench:
ce_score = (CE_zero - CE_sae) / (CE_zero - CE_clean), kl_score = (KL_zero - KL_sae) / KL_zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from sae.lm import LoadedLM, parse_site, splice_metrics


class SpliceScorer:
    def __init__(self, lm: LoadedLM, input_ids: torch.Tensor, site: str, *, batch_size: int = 8):
        parse_site(site, lm)
        if input_ids.ndim != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [N, T] with T >= 2, got shape {tuple(input_ids.shape)}")
        self.lm, self.site = lm, site
        self.batches = [input_ids[i : i + batch_size].to(lm.device) for i in range(0, input_ids.shape[0], batch_size)]
        with torch.no_grad():
            self.clean_logits = [lm.model(input_ids=ids, use_cache=False).logits.float() for ids in self.batches]
        clean = self._mean(None)
        zero = self._mean("zero")
        self.ce_clean, self.ce_zero, self.kl_zero = clean["ce"], zero["ce"], zero["kl"]
        if not self.ce_zero > self.ce_clean:  # the score's denominator: without a gap the ratio means nothing
            warnings.warn(f"zero-ablating {site} does not raise the LM loss (CE {self.ce_zero:.4f} vs clean "
                          f"{self.ce_clean:.4f}): CE scores are NaN at this site", stacklevel=2)

    def _mean(self, replace) -> dict[str, float]:
        ce = kl = 0.0
        count = 0
        for ids, clean in zip(self.batches, self.clean_logits, strict=True):
            m = splice_metrics(self.lm, ids, self.site, replace, clean_logits=clean)
            ce += m["ce"].double().sum().item()
            kl += m["kl"].double().sum().item()
            count += m["ce"].numel()
        return {"ce": ce / count, "kl": kl / count}

    def __call__(self, reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        s = self._mean(reconstruct)
        return {
            "ce_sae": s["ce"], "kl_sae": s["kl"],
            "ce_score": (self.ce_zero - s["ce"]) / gap if (gap := self.ce_zero - self.ce_clean) > 0 else float("nan"),
            "kl_score": (self.kl_zero - s["kl"]) / self.kl_zero if self.kl_zero > 0 else float("nan"),
        }
