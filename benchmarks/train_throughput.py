"""Steady-state SAE training throughput (tokens/s): this trainer vs a naive dense PyTorch TopK SAE.

Cases, run interleaved (one timed block of each per repeat, medians reported, warm-up steps excluded):
  (a) vanilla TopK with this trainer        (b) Matryoshka, doubling groups, this trainer
  (c) naive dense reference (below)         (d) (a) with compute_dtype=bfloat16 (+ FVU vs (a) on the same data)
  (e) (a) with --dead-fraction of the latents dead (AuxK runs every step)   (f) (d) likewise
Prints one line per case (median over repeats, [min-max]), then `speedup_vs_naive: X` ((a)/(c) tokens/s),
`matryoshka_cost: Y` ((b)/(a) time) and `dead_latent_ratio_fp32: Z` / `dead_latent_ratio_bf16: W` ((e)/(a) and
(f)/(d) tokens/s), each the median of per-repeat ratios (the cases of one repeat run back-to-back, so a ratio
sees one machine load). Timings on a shared machine are noisy: use more --repeats.
CPU threads default to 1: on a box shared with other jobs, every multi-threaded op stalls while another
process holds one of the cores, which punishes a step of many short ops (this trainer) far more than one of a
few long matmuls (the naive SAE). On a quiet machine `--threads 0` (torch's default) is faster for all cases.

  python benchmarks/train_throughput.py                       # CPU, d=576, n=4608, k=32, batch 4096, fp32
  python benchmarks/train_throughput.py --device cuda --n-latents 65536 --batch-size 8192
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae.config import SAEConfig, TrainConfig
from sae.matryoshka import resolve_partition
from sae.train import Trainer


class NaiveTopKSAE(torch.nn.Module):
    """The obvious implementation: dense encode, topk, scatter into a dense code, dense decode, MSE, Adam."""

    def __init__(self, d: int, n: int, k: int, device: torch.device):
        super().__init__()
        w = torch.randn(n, d, device=device)
        w = w / w.norm(dim=1, keepdim=True)
        self.k = k
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.t().contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(n, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        vals, idx = pre.topk(self.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, vals)
        return z @ self.W_dec + self.b_dec


class NaiveRunner:
    def __init__(self, d: int, n: int, k: int, lr: float, device: torch.device):
        torch.manual_seed(0)
        self.sae = NaiveTopKSAE(d, n, k, device)
        kw = {"fused": True} if device.type in ("cpu", "cuda") else {}
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, **kw)

    def train_step(self, x: torch.Tensor) -> None:
        loss = (self.sae(x) - x).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class TrainerRunner:
    def __init__(self, sae_cfg: SAEConfig, train_cfg: TrainConfig, dead_fraction: float = 0.0):
        self.trainer = Trainer([(sae_cfg, train_cfg)])
        member = self.trainer._members[0]
        n = sae_cfg.n_latents
        # a fixed, seeded set of latents made dead before every step (a step resets the counters of those firing)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        self.dead = perm[: round(dead_fraction * n)].to(member.device)
        self.member = member

    def train_step(self, x: torch.Tensor) -> None:
        if self.dead.numel() > 0:
            self.member.since_fired.zero_().index_fill_(0, self.dead, self.member.train_cfg.dead_tokens)
        self.trainer.fit([x])  # fit keeps metrics on the device: no host sync per step


def make_data(n_batches: int, batch: int, d: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Structured synthetic activations: a sparse mix of 8*d unit directions plus an offset and noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(8 * d, d, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    out = []
    for _ in range(n_batches):
        codes = torch.rand(batch, 8 * d, generator=g).pow(8) * (torch.rand(batch, 8 * d, generator=g) < 0.05)
        x = codes @ dirs * 4.0 + 0.1 * torch.randn(batch, d, generator=g) + 1.0
        out.append(x.to(device))
    return out


@torch.no_grad()
def eval_fvu(runner: TrainerRunner, x: torch.Tensor) -> float:
    sae = runner.trainer.saes[0]
    x_hat = sae(x)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--groups", type=int, default=4, help="Matryoshka doubling groups for case (b)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case before timing")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 on CPU (see above), torch's default elsewhere; 0 = torch's")
    p.add_argument("--dead-fraction", type=float, default=0.25, help="share of latents kept dead in cases (e), (f)")
    p.add_argument("--aux-tokens", type=int, default=None,
                   help="TrainConfig.aux_tokens for every case (default: its default; 0: the whole batch)")
    p.add_argument("--cases", default="abcdef", help="which cases to run, e.g. 'ae' (ratios need their cases)")
    a = p.parse_args()
    device = torch.device(a.device)
    threads = a.threads if a.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    d, n, k, B = a.d_in, a.n_latents, a.k, a.batch_size
    print(f"device={device} threads={torch.get_num_threads()} d_in={d} n_latents={n} k={k} batch={B} "
          f"steps/repeat={a.steps} repeats={a.repeats} warmup={a.warmup}")

    data = make_data(4, B, d, device)
    held_out = make_data(1, B, d, device, seed=1)[0]
    aux = {} if a.aux_tokens is None else {"aux_tokens": a.aux_tokens or None}
    tc = TrainConfig(device=a.device, warmup_steps=0, compute_dtype="float32", **aux)
    print(f"aux_tokens={tc.aux_tokens or 'the whole batch'}")
    bf16 = tc.model_copy(update={"compute_dtype": "bfloat16"})
    base = SAEConfig(d_in=d, n_latents=n, k=k)
    build = {
        "a": ("a_topk_fp32", lambda: TrainerRunner(base, tc)),
        "b": ("b_matryoshka_fp32", lambda: TrainerRunner(
            base.model_copy(update={"partition": resolve_partition(f"doubling:{a.groups}", n)}), tc)),
        "c": ("c_naive_dense_fp32", lambda: NaiveRunner(d, n, k, tc.learning_rate(n), device)),
        "d": ("d_topk_bf16", lambda: TrainerRunner(base, bf16)),
        "e": ("e_topk_dead_fp32", lambda: TrainerRunner(base, tc, a.dead_fraction)),
        "f": ("f_topk_dead_bf16", lambda: TrainerRunner(base, bf16, a.dead_fraction)),
    }
    if not set(a.cases) <= set(build):
        p.error(f"--cases must use letters from 'abcdef', got {a.cases!r}")
    cases: dict[str, object] = {build[c][0]: build[c][1]() for c in "abcdef" if c in a.cases}
    step_of = dict.fromkeys(cases, 0)

    def run(name: str, steps: int) -> float:
        runner = cases[name]
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            runner.train_step(data[step_of[name] % len(data)])
            step_of[name] += 1
        sync(device)
        return time.perf_counter() - t

    for name in cases:
        run(name, a.warmup)
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every repeat
            times[name].append(run(name, a.steps) / a.steps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in med.items():
        spread = f"[{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f} ms]"
        extra = ""
        if name == "d_topk_bf16" and "a_topk_fp32" in cases:
            f32, bf16 = eval_fvu(cases["a_topk_fp32"], held_out), eval_fvu(cases[name], held_out)
            rel = abs(bf16 - f32) / f32
            extra = f"  fvu_bf16={bf16:.5f} fvu_fp32={f32:.5f} rel_diff={rel:.4%} within_1%={rel <= 0.01}"
        print(f"{name}: {B / t:,.0f} tokens/s  {t * 1e3:.1f} ms/step {spread}{extra}")

    def paired(num: str, den: str) -> float:  # median of per-repeat ratios: robust to drifting machine load
        return statistics.median(x / y for x, y in zip(times[num], times[den], strict=True))

    if {"a_topk_fp32", "c_naive_dense_fp32"} <= set(cases):
        print(f"speedup_vs_naive: {paired('c_naive_dense_fp32', 'a_topk_fp32'):.2f}")
    if {"a_topk_fp32", "b_matryoshka_fp32"} <= set(cases):
        print(f"matryoshka_cost: {paired('b_matryoshka_fp32', 'a_topk_fp32'):.3f}")
    for dt, alive, dead in (("fp32", "a_topk_fp32", "e_topk_dead_fp32"), ("bf16", "d_topk_bf16", "f_topk_dead_bf16")):
        if {alive, dead} <= set(cases):  # tokens/s with dead latents over tokens/s without
            print(f"dead_latent_ratio_{dt}: {paired(alive, dead):.3f}")


if __name__ == "__main__":
    main()
