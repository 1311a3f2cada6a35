"""The sparse autoencoder: TopK / BatchTopK encoder, unit-norm decoder, input normalisation.

Why the odd shapes: only the encoder matmul is dense. Everything after the TopK touches the k active
latents per token (decode = `embedding_bag` over rows of W_dec; encoder gradients via `SparseEncoderGrad`),
which is what makes training several times faster than a dense reference at the same n and k.

Host syncs: on a CPU they are free, so the step takes data-dependent shapes where they save work (BatchTopK's
kept width, AuxK over the dead latents only, COO sparse matmuls, which coalesce). On an accelerator each one
stalls the pipeline, so a `sync_free` step (`SparseAutoencoder.sync_free`, set by the Trainer) keeps every shape
fixed: the full BatchTopK width, gradients by index_add_ (`coo_mm(sync_free=True)`), AuxK masked over all
latents (sae.train). Both give the same numbers up to float rounding in fp32, and nearly so in bf16, where
tied pre-activations may pick different latents (tests/test_sync_free.py).

Spaces: W_dec and b_dec live in *normalised* space (raw x times `cfg.input_scale`, so the mean input norm is
sqrt(d_in)); `encode` takes raw x and `decode` returns raw x, so a saved SAE maps raw activations to raw.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.config import SAEConfig

BATCHTOPK_ROW_CAP = 4  # in training, one token may keep at most this many times k latents (bounds memory)


def fixed_shapes_on(device: torch.device, override: bool | None = None) -> bool:
    """Whether work on `device` keeps its shapes fixed instead of reading a data-dependent size from it: off the
    CPU, where each such read stalls the device's queue, unless `override` says. The one rule for training
    (`SparseAutoencoder.sync_free`) and evaluation (sae.prune's reduced codes and masked residuals)."""
    return device.type != "cpu" if override is None else override


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """The module in eval mode for the block, then back in the mode it was in: an evaluation inside a training
    run leaves the SAE training (BatchTopK's batch rule applies only while training)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # the one name table


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def geometric_median(x: Tensor, *, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld iterations: the point minimising the sum of Euclidean distances (robust to outlier tokens)."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            y = y_new
            break
        y = y_new
    return y


COO_MM_CHUNK_ELEMS = 1 << 25  # gathered [entries, d] elements per index_add_ chunk of the sync-free coo_mm


def coo_mm(rows: Tensor, cols: Tensor, vals: Tensor, dense: Tensor, n_rows: int, *, sync_free: bool = False
           ) -> Tensor:
    """S @ dense for the sparse S [n_rows, dense.shape[0]] with entries vals at (rows, cols); -> [n_rows, d].

    This is how every weight gradient here touches only the active latents. Profiled on a 2-core CPU at
    B=4096, d=576, n=4608, k=32 (x^T G): COO sparse.mm 10 ms, CSR 12-14 ms, embedding-bag backward 15 ms,
    chunked index_add 190 ms, dense matmul 125 ms. A COO matmul coalesces its entries first, whose count the
    host must read; `sync_free` instead adds each entry's scaled row of `dense` into its output row with
    index_add_ (in chunks of COO_MM_CHUNK_ELEMS gathered elements), shapes fixed, for accelerators.
    """
    if sync_free:
        out = dense.new_zeros(n_rows, dense.shape[1])
        step = max(1, COO_MM_CHUNK_ELEMS // max(1, dense.shape[1]))
        for s in range(0, rows.numel(), step):
            e = slice(s, s + step)
            out.index_add_(0, rows[e], dense.index_select(0, cols[e]) * vals[e, None].to(dense.dtype))
        return out
    s = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals.to(dense.dtype), (n_rows, dense.shape[0]),
                                check_invariants=False)
    return torch.sparse.mm(s, dense)


def token_ids(indices: Tensor) -> Tensor:
    """Row (token) of every entry of a [B, k] index tensor, flattened."""
    B, k = indices.shape
    return torch.arange(B, device=indices.device).repeat_interleave(k)


class _DecoderWeightGrad(torch.autograd.Function):
    """Identity on a decode's output whose backward adds dW_dec = sum over entries of value * grad(bag).

    Pairs with an embedding bag over a *detached* W_dec (which supplies the gradient of the values), so the
    decoder gradient is one sparse matmul instead of embedding_bag's sort-heavy dense backward.
    """

    @staticmethod
    def forward(ctx, out, values, rows, bags, W_dec, sync_free):
        ctx.save_for_backward(values, rows, bags)
        ctx.n, ctx.sync_free = W_dec.shape[0], sync_free
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        values, rows, bags = ctx.saved_tensors
        dW = coo_mm(rows, bags, values, grad, ctx.n, sync_free=ctx.sync_free) if ctx.needs_input_grad[4] else None
        return grad, None, None, None, dW, None


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, offsets: Tensor | None = None,
                  bags: Tensor | None = None, *, sync_free: bool = False) -> Tensor:
    """sum_j values_j W_dec[indices_j] per bag, B*k*d work forward and backward (no dense decode).

    Without offsets the bags are the rows of [B, k] `values`/`indices`; with offsets (1-D inputs) `bags`
    gives each entry's bag, as for the Matryoshka per-group partial decodes. `sync_free`: the decoder gradient
    without a host sync (`coo_mm`).
    """
    vals = values.to(W_dec.dtype)
    out = F.embedding_bag(indices, W_dec.detach(), offsets, per_sample_weights=vals, mode="sum")
    if not (torch.is_grad_enabled() and W_dec.requires_grad):
        return out
    if bags is None:
        bags = token_ids(indices)
    return _DecoderWeightGrad.apply(out, vals.detach().reshape(-1), indices.reshape(-1), bags, W_dec, sync_free)


class SparseEncoderGrad(torch.autograd.Function):
    """Identity on the selected activations whose backward sends gradients to W_enc, b_enc, b_dec sparsely.

    values[b, j] = ReLU(((x - b_dec) W_enc + b_enc)[b, indices[b, j]]) were computed without autograd; here
    d/dW_enc = xc^T G and d/db_enc = sum_b G with G the [B, n] gradient that is non-zero only at the k selected
    (and firing) latents of each token; d/db_dec = -W_enc d/db_enc (no per-token dense product needed).
    `sync_free`: xc^T G without a host sync (`coo_mm`).
    """

    @staticmethod
    def forward(ctx, values, indices, xc, W_enc, b_enc, b_dec, sync_free=False):
        ctx.save_for_backward(values, indices, xc, W_enc)
        ctx.sync_free = sync_free
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        values, indices, xc, W_enc = ctx.saved_tensors
        g = torch.where(values > 0, grad_values, torch.zeros_like(grad_values)).to(W_enc.dtype)
        n = W_enc.shape[1]
        db_enc = W_enc.new_zeros(n).index_add_(0, indices.reshape(-1), g.reshape(-1))
        dW_enc = None
        if ctx.needs_input_grad[3]:  # xc^T G = (G^T xc)^T with G^T [n, B] sparse
            dW_enc = coo_mm(indices.reshape(-1), token_ids(indices), g.reshape(-1), xc, n,
                            sync_free=ctx.sync_free).t().contiguous()
        db_dec = -(W_enc @ db_enc) if ctx.needs_input_grad[5] else None
        return None, None, None, dW_enc, db_enc, db_dec, None


class DenseAuxDecode(torch.autograd.Function):
    """e_hat = z W_dec[cols] for a code over the latent subset `cols` that is dense enough for BLAS to win.

    z [B, len(cols)] is scattered from (values, local indices) [B, k'] picked without autograd from the ReLU'd
    pre-activations (the AuxK code over the dead latents); the backward sends gradients to W_dec[cols] (z^T g),
    W_enc[:, cols] (xc^T G), b_enc[cols] and b_dec, with G the code gradient kept only at the picked, firing
    entries, as in SparseEncoderGrad. Three dense [B, len(cols)] x d matmuls in all (forward, dz, z^T g) plus
    xc^T G, run in `compute_dtype` when given (z is exact there: it was read off pre in that dtype).
    """

    @staticmethod
    def forward(ctx, values, local_idx, cols, xc, W_enc, b_enc, b_dec, W_dec, compute_dtype):
        cd = compute_dtype or W_dec.dtype
        z = values.new_zeros(values.shape[0], cols.numel()).scatter_(1, local_idx, values).to(cd)
        wd = W_dec.index_select(0, cols).to(cd)
        ctx.save_for_backward(values, local_idx, cols, xc, W_enc, z, wd)
        ctx.w_dec_shape = W_dec.shape
        return (z @ wd).to(W_dec.dtype)

    @staticmethod
    def backward(ctx, grad):
        values, local_idx, cols, xc, W_enc, z, wd = ctx.saved_tensors
        g = grad.to(z.dtype)
        dW_dec = None
        if ctx.needs_input_grad[7]:
            dW_dec = W_enc.new_zeros(ctx.w_dec_shape).index_copy_(0, cols, (z.t() @ g).to(W_enc.dtype))
        g_sel = (g @ wd.t()).gather(1, local_idx).to(W_enc.dtype) * (values > 0)  # only picked, firing entries
        db_enc = W_enc.new_zeros(W_enc.shape[1]).index_copy_(
            0, cols, W_enc.new_zeros(cols.numel()).index_add_(0, local_idx.reshape(-1), g_sel.reshape(-1)))
        dW_enc = None
        if ctx.needs_input_grad[4]:
            G = z.new_zeros(z.shape).scatter_(1, local_idx, g_sel.to(z.dtype))
            dW_enc = torch.zeros_like(W_enc).index_copy_(1, cols, (xc.to(z.dtype).t() @ G).to(W_enc.dtype))
        db_dec = -(W_enc @ db_enc) if ctx.needs_input_grad[6] else None
        return None, None, None, None, dW_enc, db_enc, db_dec, dW_dec, None


class SparseAutoencoder(torch.nn.Module):
    """z = TopK(ReLU((x - b_dec) W_enc + b_enc)); x_hat = z W_dec + b_dec (in normalised space)."""

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        dtype = torch_dtype(cfg.dtype)
        w = torch.randn(cfg.n_latents, cfg.d_in, generator=generator, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w.to(dtype))
        self.W_enc = torch.nn.Parameter(w.t().contiguous().to(dtype))
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.n_latents, dtype=dtype))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.compute_dtype: torch.dtype | None = None  # e.g. bfloat16 for the encoder matmul only
        self.sync_free = False  # training steps with fixed shapes (no host reads); the Trainer sets it
        self.eval()  # built for inference: BatchTopK's batch-dependent rule applies only while the Trainer steps

    @classmethod
    def from_config(cls, cfg: SAEConfig, *, seed: int | None = None) -> SparseAutoencoder:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return cls(cfg, generator=gen)

    # ----- encoder -------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"x must have shape [batch, d_in={self.cfg.d_in}], got {tuple(x.shape)}")

    def normalise(self, x: Tensor) -> Tensor:
        return x.to(self.W_dec.dtype) * self.cfg.input_scale

    def pre_activations(self, x_norm: Tensor) -> tuple[Tensor, Tensor]:
        """(xc, pre): xc = x_norm - b_dec and the dense pre-activations xc W_enc + b_enc (the one dense matmul)."""
        xc = x_norm - self.b_dec
        cd = self.compute_dtype
        if cd is not None and cd != self.W_enc.dtype:
            pre = torch.addmm(self.b_enc.to(cd), xc.to(cd), self.W_enc.to(cd))
        else:
            pre = torch.addmm(self.b_enc, xc, self.W_enc)
        return xc, pre

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse (values >= 0, indices) from dense pre-activations, by the architecture's rule."""
        k = self.cfg.k
        if self.cfg.architecture == "topk":
            vals, idx = pre.topk(k, dim=1, sorted=False)
            return vals.to(self.W_dec.dtype).clamp_min_(0), idx
        if self.training:
            return self._batch_topk(pre)
        return self._threshold_select(pre)

    def _batch_topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the k*B largest (positive) pre-activations over the whole batch; pad rows with zeros."""
        B = pre.shape[0]
        cap = min(self.cfg.n_latents, BATCHTOPK_ROW_CAP * self.cfg.k)
        vals, idx = pre.topk(cap, dim=1, sorted=True)
        vals = vals.to(self.W_dec.dtype).clamp_min_(0)
        n_keep = min(self.cfg.k * B, vals.numel())
        cut = vals.reshape(-1).topk(n_keep, sorted=False).values.min()
        keep = vals >= cut
        width = cap if self.sync_free else max(1, int(keep.sum(1).max()))  # trimming reads the width
        vals, idx = vals[:, :width], idx[:, :width]
        return torch.where(keep[:, :width], vals, torch.zeros_like(vals)), idx

    def _threshold_select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        pre = pre.to(self.W_dec.dtype)
        active = pre > self.threshold.clamp_min(0)
        width = max(1, int(active.sum(1).max()))
        vals, idx = pre.masked_fill(~active, 0).topk(width, dim=1, sorted=False)
        return vals, idx

    @torch.no_grad()
    def update_threshold(self, values: Tensor, momentum: float) -> None:
        """EMA of the smallest kept activation (BatchTopK inference rule); the first update sets it directly.

        Computed on the device without a host branch (no sync): a batch with no positive value leaves it as is.
        """
        m = torch.where(values > 0, values, torch.inf).min().float()
        ema = torch.where(self.threshold <= 0, m, self.threshold * momentum + (1 - momentum) * m)
        self.threshold.copy_(torch.where(torch.isfinite(m), ema, self.threshold))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw x [B, d] -> (values [B, k'], indices [B, k'] long); a zero value means "not firing"."""
        self._check_input(x)
        with torch.no_grad():
            _, pre = self.pre_activations(self.normalise(x))
            return self.select(pre)

    def encode_dense(self, x: Tensor) -> Tensor:
        vals, idx = self.encode(x)
        z = vals.new_zeros(x.shape[0], self.cfg.n_latents)
        return z.scatter_(1, idx, vals)

    # ----- decoder -------------------------------------------------------------------------------------
    def decode_normalised(self, values: Tensor, indices: Tensor) -> Tensor:
        """x_hat in normalised space: b_dec + sum_j values_j W_dec[indices_j] (B*k*d work, no dense decode)."""
        return sparse_decode(values, indices, self.W_dec, sync_free=self.sync_free) + self.b_dec

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        return self.decode_normalised(values, indices) / self.cfg.input_scale

    def decode_dense(self, z: Tensor) -> Tensor:
        return (z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.cfg.input_scale

    def forward(self, x: Tensor) -> Tensor:
        vals, idx = self.encode(x)
        return self.decode(vals, idx)

    # ----- training support ------------------------------------------------------------------------------
    def encode_for_training(self, x_norm: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(values with sparse grad path, indices, xc, pre) for the trainer; pre is detached, for AuxK."""
        with torch.no_grad():
            xc, pre = self.pre_activations(x_norm)
            vals, idx = self.select(pre)
        vals = SparseEncoderGrad.apply(vals, idx, xc, self.W_enc, self.b_enc, self.b_dec, self.sync_free)
        return vals, idx, xc, pre

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the component of each W_dec row's gradient along the row (rows stay on the sphere)."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    @torch.no_grad()
    def initialise_from_sample(self, x_raw: Tensor) -> SparseAutoencoder:
        """Set input_scale (mean norm -> sqrt(d_in)) and b_dec = geometric median of the scaled sample."""
        self._check_input(x_raw)
        x = x_raw.float()
        if not torch.isfinite(x).all():
            raise ValueError("initialise_from_sample: x_raw contains NaN or Inf; clean the activations first")
        mean_norm = float(x.norm(dim=1).mean())
        if not mean_norm > 0:
            raise ValueError("initialise_from_sample: x_raw has zero mean norm; cannot set input_scale")
        scale = math.sqrt(self.cfg.d_in) / mean_norm
        self.cfg = self.cfg.model_copy(update={"input_scale": scale})
        self.b_dec.copy_(geometric_median(x * scale).to(self.b_dec.dtype))
        return self
