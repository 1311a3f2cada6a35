"""Sparse probing finds a planted label latent; token concentration on pure and spread latents; the proxies'
baselines: frequency matching removes the firing-rate confound, size-matched random subsets give lift ~0 by
chance, and every probe sees the same number of candidates."""

import math

import pytest
import torch

from sae.interp import (
    FREQ_BIN_EDGES,
    ProbeDataError,
    firing_frequency,
    frequency_matched_concentration,
    group_latents,
    proxy_report,
    random_subset_baseline,
    sparse_probe,
    token_concentration,
)

N_LAT, K = 40, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """The probe's tensors are tiny: on a shared CPU, OpenMP threads only add contention (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _planted_codes(n=600, seed=0, labels=None):
    """Sparse codes where latent 7 fires (strongly) on label-1 tokens 90% of the time, 5% otherwise."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.4).long() if labels is None else labels
    indices = torch.stack([torch.randperm(N_LAT, generator=g)[:K] for _ in range(n)])
    indices[indices == 7] = 8  # latent 7 only where planted below
    values = torch.rand(n, K, generator=g) + 0.1
    p_fire = torch.where(labels == 1, 0.9, 0.05)
    fire = torch.rand(n, generator=g) < p_fire
    indices[fire, 0] = 7
    values[fire, 0] = 2.0 + torch.rand(int(fire.sum()), generator=g)
    return values, indices, labels


def test_probe_finds_planted_latent_and_beats_baseline():
    values, indices, labels = _planted_codes()
    res = sparse_probe((values, indices), labels, latents=torch.arange(N_LAT), k_features=3, seed=0)
    assert res["selected"][0] == 7
    assert res["baseline"] < 0.7 and res["accuracy"] > 0.85 and res["lift"] > 0.2
    dense = torch.zeros(600, N_LAT).scatter_(1, indices, values)
    assert sparse_probe(dense, labels, latents=torch.arange(N_LAT), k_features=3)["accuracy"] == res["accuracy"]
    without = sparse_probe((values, indices), labels, latents=torch.arange(10, N_LAT), k_features=3, seed=0)
    assert without["accuracy"] < res["accuracy"] - 0.2  # the subset lacking latent 7 cannot probe the label


def test_probe_pools_per_context_and_accepts_string_labels():
    ctx = torch.arange(800) // 8
    labels = (torch.rand(100, generator=torch.Generator().manual_seed(2)) < 0.3).long().repeat_interleave(8)
    values, indices, _ = _planted_codes(n=800, seed=1, labels=labels)  # label constant within each context
    token_labels = labels.clone()
    token_labels[::8] = 1 - token_labels[::8]
    names = ["history" if int(v) else "science" for v in labels]
    res = sparse_probe((values, indices), names, latents=torch.arange(N_LAT), k_features=2, context_ids=ctx)
    assert res["n_train"] + res["n_test"] == 100 and res["n_classes"] == 2
    assert res["selected"][0] == 7 and res["accuracy"] > 0.9 > res["baseline"]
    with pytest.raises(ValueError, match="constant within each context"):
        sparse_probe((values, indices), token_labels, latents=torch.arange(N_LAT), context_ids=ctx)


def test_token_concentration():
    g = torch.Generator().manual_seed(0)
    n = 500
    tokens = torch.randint(0, 100, (n,), generator=g)
    tokens[::5] = 42
    indices = torch.full((n, 2), 3)
    values = torch.zeros(n, 2)
    values[tokens == 42, 0] = 1.0 + torch.rand(int((tokens == 42).sum()), generator=g)
    indices[:, 0] = 0  # latent 0 fires only on token 42
    indices[:, 1] = 1  # latent 1 fires on every token, spread over the vocabulary
    values[:, 1] = torch.rand(n, generator=g) + 0.01
    conc = token_concentration(values, indices, tokens, n_latents=4, top=50)
    assert conc[0] == 1.0
    assert conc[1] < 0.5
    assert math.isnan(conc[2]) and math.isnan(conc[3])  # never fired (latent 3 only as zero padding)
    rep = proxy_report(values, indices, tokens, 4, latents=torch.tensor([0, 1, 2]), top=50, min_activations=1,
                       random_draws=0)
    assert rep["n_judged"] == 2 and rep["token_conc"] == pytest.approx((1.0 + float(conc[1])) / 2)


def test_top_n_counts_only_largest_activations():
    tokens = torch.tensor([5] * 10 + [6] * 30)
    values = torch.cat([torch.full((10,), 9.0), torch.full((30,), 1.0)])[:, None]
    indices = torch.zeros(40, 1, dtype=torch.long)
    assert token_concentration(values, indices, tokens, 1, top=10)[0] == 1.0  # top 10 are all token 5
    assert token_concentration(values, indices, tokens, 1, top=40)[0] == 0.75


def test_group_latents():
    groups = group_latents((4, 8, 16))
    assert [g.tolist()[:2] for g in groups] == [[0, 1], [4, 5], [8, 9]] and [len(g) for g in groups] == [4, 4, 8]


def _pack(pos: torch.Tensor, lat: torch.Tensor, val: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes (values, indices) [N, w] from (token position, latent, value) events, zero-padded."""
    order = torch.sort(pos, stable=True).indices
    pos, lat, val = pos[order], lat[order], val[order]
    counts = torch.bincount(pos, minlength=n_tokens)
    slot = torch.arange(pos.numel()) - (counts.cumsum(0) - counts)[pos]
    width = max(int(counts.max()), 1)
    values, indices = torch.zeros(n_tokens, width), torch.zeros(n_tokens, width, dtype=torch.long)
    values[pos, slot], indices[pos, slot] = val, lat
    return values, indices


def _token_codes(fires: torch.Tensor, p_pref: torch.Tensor, n_tokens: int = 20000, vocab: int = 40, seed: int = 0):
    """Latent j fires `fires[j]` times, each time on its own preferred token with probability p_pref[j], else on a
    uniformly random other token; values are independent of tokens. So p_pref is the latent's true concentration."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n_tokens,), generator=g)
    pref = torch.randint(0, vocab, (fires.numel(),), generator=g)
    pos, lat = [], []
    for j, (f, p) in enumerate(zip(fires.tolist(), p_pref.tolist(), strict=True)):
        n_pref = int((torch.rand(f, generator=g) < p).sum())
        on, off = torch.nonzero(tokens == pref[j]).squeeze(1), torch.nonzero(tokens != pref[j]).squeeze(1)
        pos += [on[torch.randperm(on.numel(), generator=g)[:n_pref]], off[torch.randperm(off.numel(), generator=g)[: f - n_pref]]]
        lat.append(torch.full((f,), j))
    pos, lat = torch.cat(pos), torch.cat(lat)
    values, indices = _pack(pos, lat, 0.1 + torch.rand(pos.numel(), generator=g), n_tokens)
    return values, indices, tokens


N_TOK_LAT = 1024
FIRES = torch.logspace(math.log10(6), math.log10(400), N_TOK_LAT).round().long()  # ~3e-4 .. 2e-2 of 20k tokens


def test_frequency_matching_removes_the_firing_rate_confound():
    values, indices, tokens = _token_codes(FIRES, torch.full((N_TOK_LAT,), 0.05))  # equal true concentration
    rare, frequent = torch.arange(0, 256, 2), torch.arange(N_TOK_LAT - 256, N_TOK_LAT, 2)
    r = proxy_report(values, indices, tokens, N_TOK_LAT, latents=rare, random_draws=0)
    f = proxy_report(values, indices, tokens, N_TOK_LAT, latents=frequent, random_draws=0)
    raw_gap, excess_gap = r["token_conc"] - f["token_conc"], r["token_conc_excess"] - f["token_conc_excess"]
    assert raw_gap > 0.05  # the confound: rare latents look concentrated by chance
    assert abs(excess_gap) < 0.2 * raw_gap and abs(excess_gap) < 0.015
    assert r["n_matched"] == r["n_judged"] == 128
    conc = token_concentration(values, indices, tokens, N_TOK_LAT, top=32, min_activations=5)
    freq = firing_frequency(values, indices, N_TOK_LAT)
    assert torch.equal(freq, FIRES.double() / 20000)
    whole = frequency_matched_concentration(conc, freq, torch.arange(N_TOK_LAT))
    assert whole.excess == pytest.approx(0.0, abs=1e-12)  # leave-one-out: the whole SAE is its own reference
    # the binned means let two subsets be compared within one frequency bin: there they agree with the reference
    low = frequency_matched_concentration(conc, freq, rare)
    b = int(low.subset_count.argmax())
    assert low.edges[b] == FREQ_BIN_EDGES[b] and low.subset_count[b] > 10
    assert abs(float(low.subset_mean[b] - low.reference_mean[b])) < 0.03
    assert set(low.binned()) == {f"token_conc_logf{FREQ_BIN_EDGES[j]:g}" for j in torch.nonzero(low.subset_count).flatten().tolist()}


def test_planted_detectors_lift_over_size_matched_random_subsets():
    detectors = torch.arange(3, N_TOK_LAT, 16)  # 64 single-token detectors spread over all frequencies
    p = torch.full((N_TOK_LAT,), 0.05)
    p[detectors] = 1.0
    values, indices, tokens = _token_codes(FIRES, p, seed=1)
    det = proxy_report(values, indices, tokens, N_TOK_LAT, latents=detectors)
    assert det["token_conc"] == 1.0 and det["token_conc_lift"] > 0.6 and det["token_conc_excess"] > 0.6
    rand = torch.randperm(N_TOK_LAT, generator=torch.Generator().manual_seed(7))[:64]
    rnd = proxy_report(values, indices, tokens, N_TOK_LAT, latents=rand)
    assert abs(rnd["token_conc_lift"]) < max(3 * rnd["token_conc_random_std"], 0.02) and rnd["token_conc_random_std"] > 0
    assert abs(rnd["token_conc_excess"]) < 0.05
    assert det["token_conc_random"] == rnd["token_conc_random"]  # same seed, same size: the same random subsets


def test_random_subset_baseline_draws_seeded_subsets_of_the_pool():
    seen: list[torch.Tensor] = []

    def metric(s: torch.Tensor) -> float:
        seen.append(s)
        return float(s.double().mean())

    res = random_subset_baseline(metric, 100, 10, draws=4, seed=3, pool=torch.arange(50, 80))
    assert len(seen) == 4 and all(s.numel() == 10 and s.unique().numel() == 10 and s.min() >= 50 and s.max() < 80
                                  for s in seen)
    values = torch.tensor([float(s.double().mean()) for s in seen], dtype=torch.float64)
    assert res == {"mean": float(values.mean()), "std": float(values.std()), "n_draws": 4.0}
    again = random_subset_baseline(lambda s: float(s.double().mean()), 100, 10, draws=4, seed=3, pool=torch.arange(50, 80))
    assert again == res
    nan = random_subset_baseline(lambda s: math.nan, 100, 10)
    assert math.isnan(nan["mean"]) and nan["n_draws"] == 0


def _topic_codes(n_latents=2048, n_topic=64, n_docs=160, doc_len=40, k=8, seed=0):
    """Latents [0, n_topic) fire per token with probability 0.05 in topic-1 documents and 0.02 in topic-0 ones (weak
    alone, strong together); every token also has k noise latents from the rest."""
    g = torch.Generator().manual_seed(seed)
    n = n_docs * doc_len
    doc_ids = torch.arange(n) // doc_len
    labels = (torch.arange(n_docs) % 2).repeat_interleave(doc_len)
    noise = n_topic + torch.rand(n, n_latents - n_topic, generator=g).topk(k, dim=1).indices
    fire = torch.rand(n, n_topic, generator=g) < torch.where(labels == 1, 0.05, 0.02)[:, None]
    values = torch.cat([0.1 + torch.rand(n, k, generator=g), fire * (0.5 + torch.rand(n, n_topic, generator=g))], 1)
    indices = torch.cat([noise, torch.arange(n_topic).expand(n, n_topic)], 1)
    return values, indices, torch.randint(0, 50, (n,), generator=g), labels, doc_ids


def test_probe_draws_the_same_number_of_candidates_for_every_group():
    values, indices, _, labels, docs = _topic_codes()
    big = sparse_probe((values, indices), labels, latents=torch.arange(1024, 2048), candidates=64, context_ids=docs)
    assert len(big["candidates"]) == 64 and len(set(big["candidates"])) == 64
    assert set(big["candidates"]) <= set(range(1024, 2048)) and set(big["selected"]) <= set(big["candidates"])
    small = sparse_probe((values, indices), labels, latents=torch.arange(100, 140), candidates=64, context_ids=docs)
    assert small["candidates"] == list(range(100, 140))
    other = sparse_probe((values, indices), labels, latents=torch.arange(1024, 2048), candidates=64, seed=1,
                         context_ids=docs)
    assert other["candidates"] != big["candidates"]
    # why: at equal topic-latent density, 1,024 latents beat 64 only by having more chances; equal candidates fix it
    small = torch.cat([torch.arange(4), torch.arange(64, 124)])  # 4 topic latents of 64
    large = torch.cat([torch.arange(64), torch.arange(1024, 1984)])  # 64 of 1,024: the same density

    def mean_acc(latents: torch.Tensor, candidates: int | None) -> float:
        return sum(sparse_probe((values, indices), labels, latents=latents, candidates=candidates, seed=s,
                                context_ids=docs)["accuracy"] for s in range(6)) / 6

    base = mean_acc(small, 64)
    assert mean_acc(large, None) - base > 0.05
    assert abs(mean_acc(large, 64) - base) < 0.04


def test_proxy_report_probe_lift_over_random_subsets_and_determinism():
    values, indices, tokens, labels, docs = _topic_codes()
    kw = dict(labels=labels, doc_ids=docs, random_draws=3)
    topic = proxy_report(values, indices, tokens, 2048, latents=torch.arange(64), **kw)
    noise = proxy_report(values, indices, tokens, 2048, latents=torch.arange(64, 128), **kw)
    assert topic["probe_acc"] > 0.8 and topic["probe_lift"] > 0.3 and topic["probe_acc_lift"] > 0.1
    assert noise["probe_acc_lift"] < 0 and topic["probe_acc_random"] == noise["probe_acc_random"]
    direct = sparse_probe((values, indices), labels, latents=torch.arange(64), context_ids=docs)
    assert (topic["probe_acc"], topic["probe_baseline"]) == (direct["accuracy"], direct["baseline"])  # pooled once
    assert set(topic) >= {"token_conc", "token_conc_excess", "token_conc_lift", "token_conc_random",
                          "token_conc_random_std", "n_judged", "probe_acc", "probe_lift", "probe_acc_random",
                          "probe_acc_random_std", "probe_acc_lift"}
    assert all(isinstance(v, float) and "/" not in k and "@" not in k for k, v in topic.items())
    again = proxy_report(values, indices, tokens, 2048, latents=torch.arange(64), **kw)
    assert again == topic  # fixed seed: identical, random baselines included
    reseeded = proxy_report(values, indices, tokens, 2048, latents=torch.arange(64), seed=1, **kw)
    assert reseeded["token_conc_random"] != topic["token_conc_random"]
    conc = token_concentration(values, indices, tokens, 2048, top=32, min_activations=5)
    assert proxy_report(values, indices, tokens, 2048, latents=torch.arange(64), conc=conc, **kw) == topic


def test_unsplittable_labels_skip_the_probe():
    values, indices, tokens, labels, docs = _topic_codes(n_docs=40)
    one_class = torch.zeros_like(labels)
    with pytest.raises(ProbeDataError, match="single class"):
        sparse_probe((values, indices), one_class, latents=torch.arange(64), context_ids=docs)
    rep = proxy_report(values, indices, tokens, 2048, latents=torch.arange(64), labels=one_class, doc_ids=docs)
    assert "token_conc" in rep and not any(k.startswith("probe") for k in rep)
    both = proxy_report(values, indices, tokens, 2048, latents=torch.arange(64), labels=labels, doc_ids=docs)
    assert {"probe_acc", "probe_baseline", "probe_lift", "probe_acc_random", "probe_acc_lift"} <= set(both)
