"""Training loop: one stream of batches feeds one or several SAEs (each batch is read once).

Per step and SAE: one dense encoder matmul, TopK / BatchTopK selection, a sparse decode (vanilla, or the
Matryoshka per-group partial decodes), optional AuxK on dead latents (sparse, or dense over the dead columns when
its code is dense enough: `auxk_loss`; on an accelerator masked over all latents, `auxk_loss_masked`), sparse
encoder gradients (`SparseEncoderGrad`), decoder-gradient projection, Adam, then decoder rows back to unit norm.
State (weights, Adam moments, dead counters, thresholds, counters) round-trips through `state_dict` so a run
resumes bit-for-bit on the same CPU (on CUDA, atomic adds in index_add_ and sparse coalescing make runs
reproducible only up to float rounding).
"""

from __future__ import annotations

import ctypes
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

from sae.config import SAEConfig, TrainConfig
from sae.matryoshka import matryoshka_loss
from sae.model import (
    DenseAuxDecode,
    SparseAutoencoder,
    SparseEncoderGrad,
    fixed_shapes_on,
    sparse_decode,
    torch_dtype,
)

T = TypeVar("T")
FINITE_CHECK_EVERY_GPU = 50  # steps between host reads of the finiteness flags on an accelerator
METRIC_NAMES = ("loss", "mse", "fvu", "l0", "aux_loss", "dead_fraction", "lr")  # what train_step reports per SAE
PREFIX_FVU = "prefix_fvu/"  # + <m>: a Matryoshka SAE's training FVU of prefix m, one per group boundary
# AuxK goes dense over the dead columns once aux_k / n_dead reaches this. Measured on the 2-core dev box (d=576,
# n=4608, B=4096, aux_k=288, forward+backward): the sparse kernels (embedding bag, COO matmuls) reach ~1/10 of a
# BLAS matmul's flop/s, so dense wins from density ~0.08 (fp32) / ~0.07 (bf16): at 0.25 it takes ~0.55x the time,
# at 0.06 ~1.2x. Re-measure on other hardware (a GPU's crossover differs).
AUXK_DENSE_MIN_DENSITY = 0.1
_ALLOCATOR_TUNED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


def retain_freed_cpu_memory() -> bool:
    """Keep large freed blocks in the process heap instead of returning them to the OS (glibc only).

    By default glibc mmaps every block over 32 MB and unmaps it on free, so each training step page-faults its
    big temporaries ([B, n] pre-activations, [B, G, d] prefix residuals) back in: ~10-20 ms per 75 MB tensor on
    the 2-core dev box, 5-10% of a step. Raising the mmap and trim thresholds lets the heap reuse them. The cost
    is that the process keeps its peak memory. Returns whether the setting was applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return _ALLOCATOR_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _ALLOCATOR_TUNED = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _ALLOCATOR_TUNED


def restore_cpu_allocator() -> None:
    """Undo `retain_freed_cpu_memory` and hand the freed heap back to the OS (glibc malloc_trim).

    For what runs after training in the same process (evaluation). Its buffers differ in size from the step's,
    and on a heap that still holds the training's freed blocks and never trims they fragment it: measured on
    the dev box (n=2048, 250 steps, then one SAE's evaluation), a peak of 5.6 GB with the tuned heap, even
    after a malloc_trim, against 2.3-2.4 GB with glibc's defaults restored. The cost: evaluation page-faults its
    big temporaries in anew (41 s against 31 s for that SAE when the heap is tuned from the start).
    """
    global _ALLOCATOR_TUNED
    if not _ALLOCATOR_TUNED:
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # glibc's defaults
    libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    libc.malloc_trim(0)
    _ALLOCATOR_TUNED = False


class _Member:
    """One SAE with its optimiser and dead-latent counters."""

    def __init__(self, sae_cfg: SAEConfig, train_cfg: TrainConfig):
        if sae_cfg.dtype != "float32":
            raise ValueError(
                f"SAEConfig.dtype must be 'float32' for training (fp32 master weights), got {sae_cfg.dtype!r}; "
                "use TrainConfig.compute_dtype='bfloat16' for bf16 compute and cast the trained SAE afterwards"
            )
        self.train_cfg = train_cfg
        self.device = torch.device(train_cfg.device)
        self.sae = SparseAutoencoder.from_config(sae_cfg, seed=train_cfg.seed).to(self.device)
        with torch.no_grad():
            self.sae.W_enc.mul_(train_cfg.encoder_init_norm)
        self.compute_dtype = resolve_compute_dtype(train_cfg.compute_dtype, self.device)
        cd = torch_dtype(self.compute_dtype)
        self.sae.compute_dtype = None if cd == torch.float32 else cd
        self.nonfinite_at = torch.full((), -1, dtype=torch.long, device=self.device)  # first bad step (deferred)
        self.base_lr = train_cfg.learning_rate(sae_cfg.n_latents)
        self.aux_k = train_cfg.aux_k_for(sae_cfg.d_in, sae_cfg.n_latents)
        kw = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.base_lr, betas=train_cfg.betas,
                                    eps=train_cfg.eps, **kw)
        self.since_fired = torch.zeros(sae_cfg.n_latents, dtype=torch.long, device=self.device)
        self._idle_bound: int | None = 0  # host-side upper bound on max(since_fired); None = unknown
        self._idle_key = self._counter_key()

    def _counter_key(self) -> tuple[int, int]:
        """Changes on every write to since_fired (autograd's version counter) or when it is replaced."""
        return id(self.since_fired), self.since_fired._version

    def _none_can_be_dead(self) -> bool:
        """The host-side bound says no latent can have reached dead_tokens yet (no sync)."""
        return (self._idle_bound is not None and self._idle_key == self._counter_key()
                and self._idle_bound < self.train_cfg.dead_tokens)

    def refresh_dead_bound(self) -> None:
        """Re-read max(since_fired) into the host-side bound (one host sync, for points that sync anyway), so a
        sync-free step skips AuxK again while no latent is dead instead of running it masked every step."""
        self._idle_bound = int(self.since_fired.max())
        self._idle_key = self._counter_key()

    def dead_mask(self) -> Tensor | None:
        """[n] bool, the latents silent for dead_tokens tokens, without a host read (an accelerator's AuxK); None
        while the host-side bound rules every latent out."""
        return None if self._none_can_be_dead() else self.since_fired >= self.train_cfg.dead_tokens

    def dead_latents(self) -> Tensor | None:
        """Indices of the dead latents, or None when there are none; syncs with the host only when some may be.

        The host-side bound on max(since_fired) (it grows by at most the batch per step) skips the check, and its
        sync, until a latent could have reached dead_tokens. The bound is tied to the counter's version, so
        anything else that writes since_fired (load_state_dict, a test, a benchmark) forces an exact check.
        """
        if self._none_can_be_dead():
            return None
        dead_idx = (self.since_fired >= self.train_cfg.dead_tokens).nonzero().squeeze(1)
        self._idle_bound = None if dead_idx.numel() > 0 else int(self.since_fired.max())
        self._idle_key = self._counter_key()
        return dead_idx if dead_idx.numel() > 0 else None

    @torch.no_grad()
    def count_tokens(self, fired: Tensor, n_tokens: int) -> None:
        """since_fired += n_tokens, reset where a latent fired; advances the host bound without a sync."""
        known = self._idle_bound is not None and self._idle_key == self._counter_key()
        self.since_fired.add_(n_tokens).masked_fill_(fired, 0)
        self._idle_bound = self._idle_bound + n_tokens if known else None
        self._idle_key = self._counter_key()

    def lr_at(self, step: int, tokens_seen: int) -> float:
        """Linear warm-up over warmup_steps, then constant, then linear decay over the last decay_fraction down to
        lr_end x lr."""
        tc = self.train_cfg
        factor = min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else 1.0
        if tc.total_tokens is not None and tc.decay_fraction > 0:
            span = tc.decay_fraction * tc.total_tokens
            start = tc.total_tokens - span
            if tokens_seen > start:
                factor *= tc.lr_end + (1.0 - tc.lr_end) * max(0.0, (tc.total_tokens - tokens_seen) / span)
        return self.base_lr * factor

    def finished(self, tokens_seen: int) -> bool:
        return self.train_cfg.total_tokens is not None and tokens_seen >= self.train_cfg.total_tokens


class Trainer:
    """Trains one or several SAEs from ONE stream of batches: each batch is read once and fed to every SAE.

    `parallel` > 1 steps that many members at once in threads, each op single-threaded: on a CPU, N members
    that way keep N cores as busy as N one-thread processes would, while the batches are read once. With
    `isolate_failures`, a member whose loss turns non-finite stops (its error is in `failures`) and the others
    go on; by default it raises. A non-finite *batch* always raises: it is every member's input.
    `finite_check_every`: how often the host reads the finiteness checks of batch and loss. Each check is a
    device-side flag updated every step; reading it is a host sync, free on a CPU (default there: every step)
    and a pipeline stall on a GPU (default there: every FINITE_CHECK_EVERY_GPU steps, and on every
    `train_step`, which syncs for its float metrics anyway). A failure read late names the step it happened at.
    `sync_free` (None: on for the members on an accelerator) steps with fixed shapes, so the host never waits
    for the device between reports: BatchTopK keeps its full width, gradients go by index_add_ instead of COO
    matmuls, and AuxK runs masked over all latents once some may be dead (sae.model); the host's bound on the
    dead counters is re-read at the syncs that happen anyway (`check_finite`). On a CPU, where a host read costs
    nothing, the default path is faster. Both give the same numbers up to float rounding in fp32; with bf16
    compute, ties among bf16 pre-activations and the host path's bf16 AuxK decode make them differ slightly.
    """

    def __init__(self, members: Sequence[tuple[SAEConfig, TrainConfig]], *, parallel: int = 1,
                 isolate_failures: bool = False, finite_check_every: int | None = None,
                 sync_free: bool | None = None):
        if len(members) == 0:
            raise ValueError("members must hold at least one (SAEConfig, TrainConfig) pair")
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1 (members stepped at once), got {parallel}")
        if finite_check_every is not None and finite_check_every < 1:
            raise ValueError(f"finite_check_every must be >= 1 step (or None for the device's default), "
                             f"got {finite_check_every}")
        d = {m[0].d_in for m in members}
        if len(d) != 1:
            raise ValueError(f"members: all SAEs read the same batches, so d_in must agree, got {sorted(d)}")
        self._members = [_Member(s, t) for s, t in members]
        if any(m.device.type == "cpu" for m in self._members):
            retain_freed_cpu_memory()
        self.d_in = d.pop()
        self.tokens_seen = 0
        self.step = 0
        self.initialised = False
        self.isolate_failures = isolate_failures
        self.failures: dict[int, str] = {}  # member index -> why it stopped (isolate_failures only)
        self.parallel = min(parallel, len(self._members))
        self._pool: ThreadPoolExecutor | None = None
        on_cpu = all(m.device.type == "cpu" for m in self._members)
        self.finite_check_every = finite_check_every or (1 if on_cpu else FINITE_CHECK_EVERY_GPU)
        for m in self._members:
            m.sae.sync_free = fixed_shapes_on(m.device, sync_free)
        self._bad_batch_at: Tensor | None = None  # first step whose batch held NaN/Inf (deferred checks)

    @property
    def saes(self) -> list[SparseAutoencoder]:
        return [m.sae for m in self._members]

    @property
    def finished(self) -> bool:
        """Every member has failed or reached its TrainConfig.total_tokens."""
        return all(i in self.failures or m.finished(self.tokens_seen) for i, m in enumerate(self._members))

    def release(self) -> list[SparseAutoencoder]:
        """The SAEs in eval mode with fp32 compute (scores never depend on the training's compute dtype), freeing
        the optimiser moments, counters and threads: a trainer that is done training hands back only what
        evaluation needs (it cannot step or save its state afterwards)."""
        self.check_finite()
        self.close()
        saes = [m.sae.eval() for m in self._members]
        for sae in saes:
            sae.compute_dtype, sae.sync_free = None, False
        self._members = []
        restore_cpu_allocator()
        return saes

    @property
    def compute_dtypes(self) -> list[str]:
        """Each member's encoder compute dtype, "auto" resolved (what a run records)."""
        return [m.compute_dtype for m in self._members]

    def close(self) -> None:
        """Stop the member threads (a no-op when parallel == 1)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # ----- one step ---------------------------------------------------------------------------------------
    def _check_batch(self, batch: Tensor) -> None:
        if not isinstance(batch, Tensor) or batch.ndim != 2 or batch.shape[1] != self.d_in:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(f"batch must be a tensor of shape [batch, d_in={self.d_in}], got {shape}")
        if batch.shape[0] == 0:
            raise ValueError("batch is empty")
        if self.finite_check_every == 1:
            if not torch.isfinite(batch).all():
                raise _bad_batch_error(self.step, len(self._members))
            return
        bad = ~torch.isfinite(batch).all()
        if self._bad_batch_at is None:
            self._bad_batch_at = torch.full((), -1, dtype=torch.long, device=batch.device)
        self._bad_batch_at = torch.where(bad & (self._bad_batch_at < 0), self.step, self._bad_batch_at)

    @torch.no_grad()
    def _initialise(self, batch: Tensor) -> None:
        """input_scale and b_dec from the first batch (its first geometric_median_samples rows).

        Both depend only on the data, so members that use the same sample share one geometric median.
        """
        done: dict[tuple[int, torch.device], SparseAutoencoder] = {}
        for m in self._members:
            n = m.train_cfg.geometric_median_samples
            src = done.get((n, m.device))
            if src is None:
                done[(n, m.device)] = m.sae.initialise_from_sample(batch[:n].to(m.device, torch.float32))
            else:
                m.sae.cfg = m.sae.cfg.model_copy(update={"input_scale": src.cfg.input_scale})
                m.sae.b_dec.copy_(src.b_dec)
        self.initialised = True

    def _member_step(self, i: int, m: _Member, x: Tensor) -> dict[str, Tensor | float]:
        sae, tc, cfg = m.sae, m.train_cfg, m.sae.cfg
        lr = m.lr_at(self.step, self.tokens_seen)
        x_n = sae.normalise(x)
        sae.train()
        try:
            vals, idx, xc, pre = sae.encode_for_training(x_n)
        finally:
            sae.eval()  # outside a step an SAE encodes by the inference rule
        bounds = cfg.partition if cfg.is_matryoshka else (cfg.n_latents,)
        main, recon, per_prefix = matryoshka_loss(x_n, vals, idx, sae.W_dec, sae.b_dec, bounds, cfg.weights,
                                                  sync_free=sae.sync_free)
        loss = main
        aux = torch.zeros((), device=x.device)
        dead = None if tc.aux_coef <= 0 else m.dead_mask() if sae.sync_free else m.dead_latents()
        if dead is not None:
            rows = aux_rows(x.shape[0], tc.aux_tokens, self.step)
            residual = x_n[rows] - recon.detach()[rows]
            auxk = auxk_loss_masked if sae.sync_free else auxk_loss
            aux = auxk(sae, m.aux_k, dead, pre[rows], xc[rows], residual, normalized=tc.aux_loss == "normalized")
            loss = main + tc.aux_coef * aux
        if self.finite_check_every == 1:
            if not torch.isfinite(loss):
                raise _bad_loss_error(self.step, float(loss.detach()), i, cfg)
        else:
            bad = ~torch.isfinite(loss.detach())
            m.nonfinite_at = torch.where(bad & (m.nonfinite_at < 0), self.step, m.nonfinite_at)
        m.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        for group in m.opt.param_groups:
            group["lr"] = lr
        m.opt.step()
        sae.set_decoder_norm_to_unit()
        with torch.no_grad():
            vals = vals.detach()
            if cfg.architecture == "batchtopk":
                sae.update_threshold(vals, tc.threshold_momentum)
            fires = (vals > 0).reshape(-1).to(torch.int32)  # a scatter, not a boolean index: no host sync
            hits = torch.zeros(cfg.n_latents, dtype=torch.int32, device=x.device).index_add_(0, idx.reshape(-1), fires)
            m.count_tokens(hits > 0, x.shape[0])
            var = x_n.var(dim=0, correction=0).sum()  # per-token total variance
            fvu_per_prefix = per_prefix * (x_n.shape[1] / var.clamp_min(1e-12))
            out: dict[str, Tensor | float] = {
                "loss": loss.detach(), "mse": per_prefix[-1], "fvu": fvu_per_prefix[-1],
                "l0": (vals > 0).sum(1).float().mean(), "aux_loss": aux.detach(),
                "dead_fraction": (m.since_fired >= tc.dead_tokens).float().mean(),
                "lr": lr,
            }
            if cfg.is_matryoshka:  # per_prefix[-1] is the whole dictionary, so prefix_fvu/<n> == fvu
                out.update({f"{PREFIX_FVU}{b}": fvu_per_prefix[j] for j, b in enumerate(bounds)})
            return out

    def _step_tensors(self, batch: Tensor) -> list[dict[str, Tensor | float]] | None:
        """One step for every unfinished SAE; metrics stay tensors (no host sync) until someone reads them."""
        self._check_batch(batch)
        if not self.initialised:
            self._initialise(batch)
        active = [(i, m) for i, m in enumerate(self._members)
                  if i not in self.failures and not m.finished(self.tokens_seen)]
        if not active:
            return None
        on_device: dict[torch.device, Tensor] = {}
        for _, m in active:
            if m.device not in on_device:
                on_device[m.device] = to_device(batch, m.device).to(torch.float32)
        out: list[dict[str, Tensor | float]] = [{} for _ in self._members]
        if self.parallel > 1 and len(active) > 1:
            if self._pool is None:  # each worker thread runs its ops on one core
                self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="sae-member",
                                                initializer=torch.set_num_threads, initargs=(1,))
            steps = [(i, self._pool.submit(self._member_step, i, m, on_device[m.device])) for i, m in active]
            results = [(i, _outcome(f.result)) for i, f in steps]
        else:
            results = [(i, _outcome(lambda i=i, m=m: self._member_step(i, m, on_device[m.device]))) for i, m in active]
        for i, res in results:
            if isinstance(res, FloatingPointError):
                self._fail(i, res)
            else:
                out[i] = res
        self.step += 1
        self.tokens_seen += batch.shape[0]
        if self.finite_check_every > 1 and self.step % self.finite_check_every == 0:
            self.check_finite()
        return out

    def _fail(self, i: int, err: FloatingPointError) -> None:
        if not self.isolate_failures:
            raise err
        self.failures[i] = str(err)

    def check_finite(self) -> None:
        """Read the deferred finiteness flags (one host sync); raise, or with isolate_failures stop the members
        whose loss went non-finite. A no-op when every step is checked at once (finite_check_every = 1)."""
        if self.finite_check_every == 1:
            return
        if self._bad_batch_at is not None and (at := int(self._bad_batch_at)) >= 0:
            raise _bad_batch_error(at, len(self._members))
        for i, m in enumerate(self._members):
            if i not in self.failures and (at := int(m.nonfinite_at)) >= 0:
                self._fail(i, _bad_loss_error(at, float("nan"), i, m.sae.cfg, late=self.step))
            if m.sae.sync_free:
                m.refresh_dead_bound()

    def train_step(self, batch: Tensor, *, sync: bool = True) -> list[dict[str, float]] | list[dict[str, Tensor]]:
        """One optimiser step for every SAE on `batch` [B, d]; metrics per SAE ({} for a finished SAE).

        sync=False returns the metrics as device tensors and skips the finiteness read: no host sync, for the
        steps a loop does not report (call with sync=True, or `check_finite`, at report time).

        loss = main + aux_coef * aux_loss; mse is per element in the normalised space (mean input norm
        sqrt(d_in)); fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch (scale-free); l0 counts
        firing latents per token; dead_fraction = share of latents silent for >= dead_tokens tokens; a Matryoshka
        SAE adds prefix_fvu/<m> per group boundary m (the fvu of latents [0, m) alone; prefix_fvu/<n> == fvu).
        """
        out = self._step_tensors(batch)
        if out is None:
            return [{} for _ in self._members]
        if not sync:
            return [d if i not in self.failures else {} for i, d in enumerate(out)]
        self.check_finite()  # the float metrics below sync anyway
        return [{k: float(v) for k, v in d.items()} if i not in self.failures else {} for i, d in enumerate(out)]

    # ----- loop ---------------------------------------------------------------------------------------------
    def fit(self, batches: Iterable[Tensor], *, max_tokens: int | None = None,
            callback: Callable[[int, list[dict[str, float]]], None] | None = None,
            log_every: int = 50) -> list[SparseAutoencoder]:
        """Train until the batches run out, `max_tokens` is reached, or every SAE is finished (reached its
        total_tokens, or failed under isolate_failures). The one training loop: a sweep's trial drives it too.

        callback(tokens_seen, metrics_per_sae) runs every `log_every` steps and after the last step, with float
        metrics ({} for an SAE that is finished); the steps in between keep theirs on the device (no host sync).
        """
        if log_every <= 0:
            raise ValueError(f"log_every must be a positive step count, got {log_every}")
        pending, logged = None, True
        for batch in batches if not self.finished else ():
            if max_tokens is not None and self.tokens_seen >= max_tokens:
                break
            report = callback is not None and (self.step + 1) % log_every == 0
            pending, logged = self.train_step(batch, sync=report), report
            if report:
                callback(self.tokens_seen, pending)
            if self.finished:  # stop before reading another batch
                break
        self.check_finite()
        if callback is not None and pending is not None and not logged:
            callback(self.tokens_seen, [{k: float(v) for k, v in d.items()} for d in pending])
        return self.saes

    # ----- resumable state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.check_finite()  # never checkpoint weights a late-read NaN has already spoilt without saying so
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "initialised": self.initialised,
            "failures": dict(self.failures),
            "members": [
                {"sae_cfg": m.sae.cfg.model_dump(), "sae": m.sae.state_dict(), "optimizer": m.opt.state_dict(),
                 "since_fired": m.since_fired.clone()}
                for m in self._members
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["members"]) != len(self._members):
            raise ValueError(f"state_dict holds {len(state['members'])} SAEs but this trainer has "
                             f"{len(self._members)}; build the Trainer with the same members")
        for i, (m, s) in enumerate(zip(self._members, state["members"], strict=True)):
            cfg = SAEConfig(**s["sae_cfg"])
            if cfg.model_copy(update={"input_scale": 1.0}) != m.sae.cfg.model_copy(update={"input_scale": 1.0}):
                raise ValueError(f"state_dict member {i} was trained with {cfg}, not {m.sae.cfg}")
            m.sae.cfg = cfg
            m.sae.load_state_dict(s["sae"])
            m.opt.load_state_dict(s["optimizer"])
            m.since_fired.copy_(s["since_fired"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.initialised = bool(state["initialised"])
        self.failures = {int(i): str(why) for i, why in state.get("failures", {}).items()}


def _bad_batch_error(step: int, n_members: int) -> FloatingPointError:
    return FloatingPointError(f"step {step}: input batch contains NaN or Inf (fed to all {n_members} SAEs); fix the "
                              "activation source (e.g. harvest in float32) before training")


def _bad_loss_error(step: int, loss: float, i: int, cfg: SAEConfig, late: int | None = None) -> FloatingPointError:
    seen = f" (found at step {late}: finiteness is read every few steps on this device)" if late is not None else ""
    return FloatingPointError(f"step {step}: loss is {loss} for SAE {i} (n_latents={cfg.n_latents}, k={cfg.k}){seen}; "
                              "lower TrainConfig.lr or check the inputs")


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively: a CUDA GPU with bf16 (Ampere and later), or a CPU with
    AVX512-BF16 or AMX-BF16 (x86) / BF16 (Arm) instructions, read from /proc/cpuinfo (Linux)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_compute_dtype(requested: str, device: str | torch.device) -> str:
    """TrainConfig.compute_dtype with "auto" decided for `device`: bfloat16 where native, else float32."""
    if requested != "auto":
        return requested
    return "bfloat16" if native_bf16(device) else "float32"


def to_device(batch: Tensor, device: str | torch.device) -> Tensor:
    """`batch` on `device`. From host memory to a GPU it goes through pinned memory: a copy from pageable memory
    may wait for the GPU's queue to drain first (CUDA stages it through a driver buffer), while a pinned copy is
    queued behind the running step and the host goes on to read the next batch."""
    dev = torch.device(device)
    if dev.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(dev, non_blocking=True)
    return batch.to(dev)


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """`items` produced up to `depth` ahead in a background thread. Reading and decoding shards, shuffling them
    and pinning a batch all release the GIL, so on a GPU the host prepares the next batches while the device
    runs the current step, instead of the device waiting for them. On a CPU trial the step already takes the
    trial's cores, so there is nothing to overlap (callers prefetch off the CPU only). An error in the producer is
    raised here in the item's place; closing this generator stops the producer and closes `items`."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, object]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = None
        try:
            source = iter(items)
            for item in source:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            put(("error", err))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="prefetch", daemon=True)
    producer.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "item":
                yield value
            elif kind == "done":
                return
            else:
                raise value
    finally:
        stop.set()
        producer.join()


def _outcome(step: Callable[[], dict]) -> dict | FloatingPointError:
    """A member step's metrics, or the FloatingPointError it raised (so one member's NaN can stop only it)."""
    try:
        return step()
    except FloatingPointError as err:
        return err


def aux_rows(batch: int, aux_tokens: int | None, step: int) -> slice:
    """The rows of a batch that AuxK sees this step: all, or a window of aux_tokens rows that moves each step (a
    resumed run picks the same rows). Batches arrive shuffled, so which rows a window covers carries no bias."""
    if aux_tokens is None or aux_tokens >= batch:
        return slice(None)
    start = (step * aux_tokens) % (batch - aux_tokens + 1)
    return slice(start, start + aux_tokens)


def auxk_loss(sae: SparseAutoencoder, aux_k: int, dead_idx: Tensor, pre: Tensor, xc: Tensor, residual: Tensor,
              *, normalized: bool = False, dense: bool | None = None) -> Tensor:
    """AuxK (Gao et al.): the top aux_k *dead* latents of each token reconstruct the (detached) main residual.

    pre [B, n] are the step's pre-activations (no grad), xc = x_norm - b_dec; returns the per-element MSE, divided
    by the residual's per-element variance when `normalized` (TrainConfig.aux_loss). Gradients reach W_enc,
    b_enc, b_dec and W_dec of the selected dead latents. `dense=None` picks the path by the code's density
    aux_k / n_dead (AUXK_DENSE_MIN_DENSITY): both give the same loss and gradients up to float rounding.
    """
    n_dead = dead_idx.numel()
    ka = min(aux_k, n_dead)
    with torch.no_grad():
        pre_dead = pre.index_select(1, dead_idx)
        av, ai = pre_dead.topk(ka, dim=1, sorted=False)
        av = av.float().clamp_min_(0)
    if dense is None:
        dense = ka >= AUXK_DENSE_MIN_DENSITY * n_dead
    if dense:
        e_hat = DenseAuxDecode.apply(av, ai, dead_idx, xc, sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec,
                                     sae.compute_dtype)
    else:
        ai = dead_idx[ai]
        av = SparseEncoderGrad.apply(av, ai, xc, sae.W_enc, sae.b_enc, sae.b_dec)
        e_hat = sparse_decode(av, ai, sae.W_dec)
    aux = (e_hat - residual).pow(2).mean()
    if normalized:
        aux = aux / residual.var(dim=0, correction=0).mean().clamp_min(1e-12)
    return aux


def auxk_loss_masked(sae: SparseAutoencoder, aux_k: int, dead: Tensor, pre: Tensor, xc: Tensor, residual: Tensor,
                     *, normalized: bool = False) -> Tensor:
    """`auxk_loss` without a host read: `dead` is an [n] bool mask, not an index list whose length the host
    must know. Alive latents are masked to -inf before the top-k, so they are never picked with a value (where
    fewer than aux_k latents are dead, the extra picks are zeros, which carry no gradient), and with no dead
    latent at all the loss is 0. Costs a top-k over all n latents: for accelerators (`Trainer(sync_free=...)`)."""
    with torch.no_grad():
        av, ai = pre.masked_fill(~dead, float("-inf")).topk(min(aux_k, dead.numel()), dim=1, sorted=False)
        av = av.float().clamp_min_(0)
    av = SparseEncoderGrad.apply(av, ai, xc, sae.W_enc, sae.b_enc, sae.b_dec, True)
    e_hat = sparse_decode(av, ai, sae.W_dec, sync_free=True)
    aux = (e_hat - residual).pow(2).mean()
    if normalized:
        aux = aux / residual.var(dim=0, correction=0).mean().clamp_min(1e-12)
    return torch.where(dead.any(), aux, torch.zeros_like(aux))


def train_sae(sae_cfg: SAEConfig, train_cfg: TrainConfig, batches: Iterable[Tensor], **fit_kwargs
              ) -> SparseAutoencoder:
    """Train a single SAE; fit_kwargs go to `Trainer.fit` (max_tokens, callback, log_every)."""
    return Trainer([(sae_cfg, train_cfg)]).fit(batches, **fit_kwargs)[0]
