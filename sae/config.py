"""Typed configs for an SAE and its training, validated at construction.

Every check names the field and what would be valid, so a bad sweep spec fails before any work starts.
`SAEConfig` is what a checkpoint's cfg.json holds; `TrainConfig` is how one SAE was trained.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class TrainSettings(BaseModel):
    """How SAEs are trained: the settings a sweep spec's `train:` section holds (it composes this model, so each
    default and constraint lives here once). Defaults follow Gao et al. 2024 and Bussmann et al. 2025.

    The schedule is linear warm-up over `warmup_steps`, then constant, then linear decay to zero over the last
    `decay_fraction` of the run's tokens. AuxK reconstructs the main residual r = x - x_hat from the top `aux_k`
    latents among those that have not fired for `dead_tokens` tokens (e_hat), and adds `aux_coef` times one of
    (`aux_loss`):
      "mse"        aux = mean((e_hat - r)^2)                             (Bussmann et al.: plain per-element MSE)
      "normalized" aux = mean((e_hat - r)^2) / mean((r - mean_batch(r))^2)   (Gao et al.'s code: scale-free, so the
                   same aux_coef = 1/32 weighs AuxK far more once the main residual is small)
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    lr: float | None = Field(None, gt=0, le=1, description="Adam's step; null: 2e-4 / sqrt(n_latents / 2^14)")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), strict=False, description="Adam's betas")
    eps: float = Field(6.25e-10, gt=0, description="Adam's epsilon")
    warmup_steps: int = Field(100, ge=0, le=10**9, description="steps of linear learning-rate warm-up")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="share of the run's tokens over which the learning "
                                                               "rate decays linearly to zero (1: the whole run)")
    lr_end: float = Field(0.0, ge=0, le=1, description="where the decay ends, as a fraction of lr (0: at zero; "
                                                       "SAELens-style runs often end at 0.1)")
    aux_k: int | None = Field(None, ge=1, description="latents AuxK reconstructs from; null: min(d_in // 2, 512)")
    aux_coef: float = Field(1.0 / 32.0, ge=0, le=1000, description="weight of the AuxK loss")
    aux_loss: AuxLoss = Field("mse", description="mse (Bussmann et al.) or normalized (Gao et al.'s code)")
    # AuxK's dense matmuls over the dead columns cost about as much as the main step's encoder once a quarter of
    # the latents are dead. Its loss is a mean over tokens, so a rotating window of `aux_tokens` rows of each
    # batch estimates the same gradient at a fraction of the cost (null: every token of the batch). Measured
    # (benchmarks/train_throughput.py, d=576, n=4608, batch 4096, 25% dead): tok/s with dead latents over tok/s
    # without, 0.61 -> 0.85 (fp32) and 0.61 -> 0.83 (bf16); on SmolLM2 resid_post.15 (409,600 tokens,
    # dead_tokens=4096 so AuxK runs every step on ~3% dead) eval FVU 0.38763 (whole batch) vs 0.38752 and mean
    # dead fraction 0.0311 vs 0.0312.
    aux_tokens: int | None = Field(1024, ge=1, le=1 << 20, description="rows of each batch AuxK sees, a moving "
                                                                       "window; null: the whole batch")
    dead_tokens: int = Field(10_000_000, ge=1, le=10**12, description="tokens without firing after which a latent "
                                                                      "counts as dead (the papers: 10M)")
    threshold_momentum: float = Field(0.99, gt=0, lt=1, description="BatchTopK's running inference threshold")
    geometric_median_samples: int = Field(4096, ge=1, description="tokens whose geometric median initialises b_dec")
    # Each latent's encoder vector starts as encoder_init_norm x its (unit) decoder row. Measured on SmolLM2
    # resid_post.15 (benchmarks/train_quality.py, n=4608, k=32, 409,600 tokens, seed 0), eval FVU against a dense
    # reference trainer: 1.053x at 1.0 (the tied unit init), 0.879x at 0.577, 0.867x at 0.3, 0.871x at 0.1.
    encoder_init_norm: float = Field(0.3, gt=0, description="each encoder vector's initial norm, a multiple of its "
                                                            "unit decoder row")
    compute_dtype: ComputeDType = Field("auto", description="the encoder matmuls' dtype (weights stay float32); "
                                                            "auto: bfloat16 where the device runs it natively "
                                                            "(sae.train.native_bf16), else float32")

    def learning_rate(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)

    def aux_k_for(self, d_in: int, n_latents: int) -> int:
        k = self.aux_k if self.aux_k is not None else min(d_in // 2, 512)
        return max(1, min(k, n_latents))


class TrainConfig(TrainSettings):
    """One SAE's training run: the settings plus what the run fixes (its length, seed and device)."""

    total_tokens: int | None = Field(None, ge=1, description="the run's length, for the decay; null: no decay")
    seed: int = Field(0, description="seeds the initialisation (the batches' order is the caller's)")
    device: str = Field("cpu", pattern=r"^(cpu|mps|cuda(:\d+)?)$", description="cpu, cuda, cuda:N or mps")
    dtype: DType = Field("float32", description="the master weights: float32 (bf16 compute is compute_dtype)")

    @field_validator("dtype")
    @classmethod
    def _float32_master_weights(cls, v: str) -> str:
        if v != "float32":
            raise ValueError(f"the master weights stay float32, got {v!r}; set compute_dtype for bf16 compute")
        return v

    @classmethod
    def for_run(cls, settings: TrainSettings, *, total_tokens: int | None, seed: int, device: str) -> TrainConfig:
        """A run of `settings` (e.g. a sweep spec's `train:` section, which holds more than the settings)."""
        return cls(**{name: getattr(settings, name) for name in TrainSettings.model_fields},
                   total_tokens=total_tokens, seed=seed, device=device)
