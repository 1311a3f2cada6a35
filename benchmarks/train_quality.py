"""Speed that costs no quality: eval FVU of this trainer against a dense reference TopK trainer, same tokens.

    python benchmarks/train_quality.py [--seeds 0 1] [--tokens 409600] [--n-latents 4608]

Both trainers see the same batches of real harvested activations (the default spec's train store, SmolLM2-135M
resid_post.15; `make frontier` harvests it) with the same lr, batch, warm-up and k, and are scored on the
store's held-out eval tokens. The reference is the common dense recipe of open-source TopK trainers (as in
EleutherAI's sparsify): an nn.Linear encoder, the decoder a unit-norm copy of it, b_dec = the first batch's mean,
the batch FVU as the loss, Adam, linear warm-up then linear decay to zero over the run, the decoder's parallel
gradient removed and its rows renormalised after every step, no input scaling. Prints per seed both FVUs and
L0, then `fvu_vs_reference` = mean over seeds of ours / reference (target <= 1.005), once with this trainer's
defaults and once with `--variant` settings (default: the tied unit-norm encoder init this trainer used before;
`--variant decay_fraction=1.0` tries the reference's schedule) to find where a gap comes from.
"""

from __future__ import annotations

import argparse
import glob
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.shards import iter_batches  # noqa: E402
from orchestrator.spec import load_spec, resolve_path  # noqa: E402
from sae.config import SAEConfig, TrainConfig  # noqa: E402
from sae.train import Trainer  # noqa: E402


class ReferenceTopK(torch.nn.Module):
    def __init__(self, d: int, n: int, k: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = torch.nn.Linear(d, n)
        self.encoder.bias.data.zero_()
        self.W_dec = torch.nn.Parameter(self.encoder.weight.data.clone())
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True)
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.k = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = torch.relu(self.encoder(x - self.b_dec))
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter_(1, idx, vals)
        return z @ self.W_dec + self.b_dec, vals


def train_reference(batches: list[torch.Tensor], d: int, n: int, k: int, lr: float, warmup: int, seed: int):
    sae = ReferenceTopK(d, n, k, seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    total = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    sae.b_dec.data = batches[0].mean(0)
    for x in batches:
        x_hat, _ = sae(x)
        loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep unit-norm decoder rows: drop the gradient along each row, renormalise after
            g, w = sae.W_dec.grad, sae.W_dec.data
            g -= (g * w).sum(1, keepdim=True) * w
        opt.step()
        sched.step()
        with torch.no_grad():
            sae.W_dec.data /= sae.W_dec.data.norm(dim=1, keepdim=True)
    return sae


def train_ours(batches: list[torch.Tensor], d: int, n: int, k: int, lr: float, warmup: int, seed: int,
               overrides: dict) -> torch.nn.Module:
    tokens = sum(b.shape[0] for b in batches)
    tc = TrainConfig(**{"lr": lr, "warmup_steps": warmup, "total_tokens": tokens, "seed": seed,
                        "compute_dtype": "float32", **overrides})
    trainer = Trainer([(SAEConfig(d_in=d, n_latents=n, k=k), tc)])
    trainer.fit(batches)
    return trainer.release()[0]


@torch.no_grad()
def score(reconstruct, x: torch.Tensor) -> tuple[float, float]:
    err, nz = 0.0, 0.0
    for s in range(0, x.shape[0], 4096):
        xb = x[s : s + 4096]
        x_hat, vals = reconstruct(xb)
        err += float((x_hat.double() - xb.double()).pow(2).sum())
        nz += float((vals > 0).sum())
    var = float((x.double() - x.double().mean(0)).pow(2).sum())
    return err / var, nz / x.shape[0]


def default_stores() -> dict[str, list[str]] | None:
    """The default spec's harvested train and eval stores (what `make frontier` leaves), or None, said on stderr."""
    spec = load_spec("default")
    stores = resolve_path(spec.storage)
    found = {split: sorted(glob.glob(f"{stores}/{spec.model}.{spec.site}.{split}.*")) for split in ("train", "eval")}
    if not found["train"] or not found["eval"]:
        print(f"no harvested default-spec store under {stores}: run `make frontier` first", file=sys.stderr)
        return None
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tokens", type=int, default=409_600)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--variant", default="encoder_init_norm=1.0",
                   help="TrainConfig overrides for the second run of this trainer, 'field=value,...' (or '')")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    found = default_stores()
    if found is None:
        return 2
    steps = math.ceil(a.tokens / a.batch_size)
    variant = dict(kv.split("=") for kv in a.variant.split(",") if kv)
    variant = {key: float(v) if "." in v or "e" in v else int(v) for key, v in variant.items()}
    x_eval = torch.cat(list(iter_batches(found["eval"][0], 8192, shuffle=False)))
    print(f"store {found['train'][0]}: {steps} steps x {a.batch_size} tokens, n={a.n_latents}, k={a.k}, lr={a.lr}, "
          f"warm-up {a.warmup}; eval on {x_eval.shape[0]} held-out tokens; variant {variant or '-'}")
    ratios: dict[str, list[float]] = {"default": [], "variant": []}
    for seed in a.seeds:
        batches = []
        epoch = 0
        while len(batches) < steps:
            batches += list(iter_batches(found["train"][0], a.batch_size, shuffle=True, seed=seed * 1009 + epoch,
                                         drop_last=True))
            epoch += 1
        batches = batches[:steps]
        d = batches[0].shape[1]
        t = time.perf_counter()
        ref = train_reference(batches, d, a.n_latents, a.k, a.lr, a.warmup, seed)
        ref_fvu, ref_l0 = score(ref, x_eval)
        line = f"seed {seed}: reference fvu {ref_fvu:.5f} (L0 {ref_l0:.1f}, {time.perf_counter() - t:.0f}s)"
        for name, over in (("default", {}), ("variant", variant)):
            if name == "variant" and not variant:
                continue
            t = time.perf_counter()
            sae = train_ours(batches, d, a.n_latents, a.k, a.lr, a.warmup, seed, over)
            fvu, l0 = score(lambda x, sae=sae: (sae(x), sae.encode(x)[0]), x_eval)
            ratios[name].append(fvu / ref_fvu)
            line += f" | ours[{name}] fvu {fvu:.5f} (L0 {l0:.1f}, {time.perf_counter() - t:.0f}s, x{fvu / ref_fvu:.4f})"
        print(line, flush=True)
    print(f"fvu_vs_reference {statistics.mean(ratios['default']):.4f}")
    if ratios["variant"]:
        print(f"fvu_vs_reference_variant {statistics.mean(ratios['variant']):.4f}  ({a.variant})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
