"""Typed configs for an SAE and its training, validated at construction.

Every check names the field and what would be valid, so a bad sweep spec fails before any work starts.
`SAEConfig` is what a checkpoint's cfg.json holds; `TrainConfig` is how one SAE was trained.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

Architecture = Literal["topk", "batchtopk"]
DType = Literal["float32", "bfloat16", "float16"]
AuxLoss = Literal["mse", "normalized"]
ComputeDType = Literal["auto", "float32", "bfloat16", "float16"]  # auto: bf16 where matmuls run it natively


class SAEConfig(BaseModel):
    """Shape and encoder of one SAE.

    `partition` makes it a Matryoshka SAE: strictly increasing group boundaries m_1 < ... < m_G = n_latents
    (prefix i is latents [0, m_i)). `input_scale` multiplies raw activations before encoding (set from the
    data so their mean norm is sqrt(d_in)); the SAE divides it back out, so a saved SAE maps raw to raw.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    d_in: int
    n_latents: int
    k: int
    architecture: Architecture = "topk"
    partition: tuple[int, ...] | None = None
    group_weights: tuple[float, ...] | None = None
    input_scale: float = 1.0
    dtype: DType = "float32"

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        if self.d_in <= 0:
            raise ValueError(f"d_in must be a positive integer, got {self.d_in}")
        if self.n_latents <= 0:
            raise ValueError(f"n_latents must be a positive integer, got {self.n_latents}")
        if not 0 < self.k < self.n_latents:
            raise ValueError(f"k must satisfy 0 < k < n_latents (= {self.n_latents}), got k={self.k}")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"input_scale must be a finite positive number, got {self.input_scale}")
        if self.partition is not None:
            p = self.partition
            if len(p) == 0:
                raise ValueError("partition must hold at least one boundary (use null for a vanilla SAE)")
            if p[0] <= 0 or any(b <= a for a, b in zip(p, p[1:], strict=False)):
                raise ValueError(f"partition must be strictly increasing positive boundaries, got {list(p)}")
            if p[-1] != self.n_latents:
                raise ValueError(
                    f"partition must end at n_latents (= {self.n_latents}), got last boundary {p[-1]}"
                )
        if self.group_weights is not None:
            if self.partition is None:
                raise ValueError("group_weights needs a partition (one weight per Matryoshka group)")
            if len(self.group_weights) != len(self.partition):
                raise ValueError(
                    f"group_weights must have one weight per group ({len(self.partition)}), "
                    f"got {len(self.group_weights)}"
                )
            if any(not (math.isfinite(w) and w >= 0) for w in self.group_weights) or sum(self.group_weights) <= 0:
                raise ValueError(f"group_weights must be finite, non-negative and not all zero, got {self.group_weights}")
        return self

    @property
    def is_matryoshka(self) -> bool:
        return self.partition is not None and len(self.partition) > 1

    @property
    def weights(self) -> tuple[float, ...]:
        """Per-group loss weights, normalised to sum to 1 (default equal, w_i = 1/G)."""
        groups = self.partition or (self.n_latents,)
        raw = self.group_weights or (1.0,) * len(groups)
        total = sum(raw)
        return tuple(w / total for w in raw)


class TrainConfig(BaseModel):
    """How one SAE is trained (Gao et al. 2024; Bussmann et al. 2025 defaults).

    `lr=None` means 2e-4 / sqrt(n_latents / 2**14). The schedule is linear warm-up over `warmup_steps`, then
    constant, then linear decay to zero over the last `decay_fraction` of `total_tokens` (no decay if unknown).
    `compute_dtype` is the encoder matmul's dtype (weights stay fp32); "auto" picks bfloat16 where the device
    runs bf16 matmuls natively (sae.train.native_bf16) and float32 elsewhere.
    AuxK reconstructs the main residual r = x - x_hat from the top `aux_k` latents among those that have not fired
    for `dead_tokens` tokens (e_hat), and adds `aux_coef` times one of (`aux_loss`):
      "mse"        aux = mean((e_hat - r)^2)                             (Bussmann et al.: plain per-element MSE)
      "normalized" aux = mean((e_hat - r)^2) / mean((r - mean_batch(r))^2)   (Gao et al.'s code: scale-free, so the
                   same aux_coef = 1/32 weighs AuxK far more once the main residual is small)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 6.25e-10
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    total_tokens: int | None = None
    aux_k: int | None = None
    aux_coef: float = 1.0 / 32.0
    aux_loss: AuxLoss = "mse"
    # AuxK's dense matmuls over the dead columns cost about as much as the main step's encoder once a quarter of
    # the latents are dead. Its loss is a mean over tokens, so a rotating window of `aux_tokens` rows of each
    # batch estimates the same gradient at a fraction of the cost (null: every token of the batch). Measured
    # (benchmarks/train_throughput.py, d=576, n=4608, batch 4096, 25% dead): tok/s with dead latents over tok/s
    # without, 0.61 -> 0.85 (fp32) and 0.61 -> 0.83 (bf16); on SmolLM2 resid_post.15 (409,600 tokens,
    # dead_tokens=4096 so AuxK runs every step on ~3% dead) eval FVU 0.38763 (whole batch) vs 0.38752 and mean
    # dead fraction 0.0311 vs 0.0312.
    aux_tokens: int | None = 1024
    dead_tokens: int = 10_000_000
    threshold_momentum: float = 0.99
    geometric_median_samples: int = 4096
    # Each latent's encoder vector starts as encoder_init_norm x its (unit) decoder row. Measured on SmolLM2
    # resid_post.15 (benchmarks/train_quality.py, n=4608, k=32, 409,600 tokens, seed 0), eval FVU against a dense
    # reference trainer: 1.053x at 1.0 (the tied unit init), 0.879x at 0.577, 0.867x at 0.3, 0.871x at 0.1.
    encoder_init_norm: float = 0.3
    seed: int = 0
    device: str = "cpu"
    dtype: DType = "float32"
    compute_dtype: ComputeDType = "float32"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite positive number (or null for the default), got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each lie in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must lie in [0, 1] (1: decay over the whole run), got {self.decay_fraction}")
        if self.total_tokens is not None and self.total_tokens <= 0:
            raise ValueError(f"total_tokens must be positive (or null), got {self.total_tokens}")
        if self.aux_k is not None and self.aux_k <= 0:
            raise ValueError(f"aux_k must be a positive integer (or null for min(d_in // 2, 512)), got {self.aux_k}")
        if self.aux_coef < 0:
            raise ValueError(f"aux_coef must be >= 0, got {self.aux_coef}")
        if self.aux_tokens is not None and self.aux_tokens <= 0:
            raise ValueError(f"aux_tokens must be a positive token count (or null for the whole batch), got {self.aux_tokens}")
        if self.dead_tokens <= 0:
            raise ValueError(f"dead_tokens must be a positive token count, got {self.dead_tokens}")
        if not 0.0 < self.threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must lie in (0, 1), got {self.threshold_momentum}")
        if not (math.isfinite(self.encoder_init_norm) and self.encoder_init_norm > 0):
            raise ValueError(f"encoder_init_norm must be a finite positive number, got {self.encoder_init_norm}")
        if self.geometric_median_samples <= 0:
            raise ValueError(f"geometric_median_samples must be positive, got {self.geometric_median_samples}")
        if not (self.device == "cpu" or self.device == "mps" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        if self.dtype != "float32":
            raise ValueError(f"dtype (the master weights) must be 'float32', got {self.dtype!r}; use compute_dtype for bf16")
        return self

    def learning_rate(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)

    def aux_k_for(self, d_in: int, n_latents: int) -> int:
        k = self.aux_k if self.aux_k is not None else min(d_in // 2, 512)
        return max(1, min(k, n_latents))
