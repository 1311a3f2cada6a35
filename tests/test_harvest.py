"""orchestrator/harvest.py end to end: Ray Data harvest of the embedded model and corpus into a shard store,
reuse without LM work, resume after an interruption, and the input errors."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from orchestrator.harvest import HarvestConfig, harvest, store_complete
from orchestrator.shards import (
    ShardError,
    iter_batches,
    iter_records,
    read_manifest,
    verify_store,
)
from sae.corpus import doc_split, load_corpus, tokenize_contexts
from sae.lm import harvest_activations, load_lm, load_tokenizer

TOKENS, T = 600, 32  # 20 contexts of 31 stored tokens (the last trimmed), 4 contexts per shard -> 5 shards
REPO = Path(__file__).resolve().parent.parent

# Harvests cfg (argv[1]) with its progress on, as a sweep's driver does; the test pipes its output, like a log.
LOGGED_HARVEST = r"""
import sys, ray
from orchestrator.harvest import HarvestConfig, harvest
ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own Ray, never a `ray start` one
print("result", harvest(HarvestConfig.model_validate_json(sys.argv[1])), flush=True)
"""


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(storage, **kw) -> HarvestConfig:
    base = dict(site="resid_post.6", tokens=TOKENS, context_length=T, shard_rows=4 * (T - 1), batch_size=4,
                storage=str(storage), num_cpus_per_actor=1, torch_threads=2)
    return HarvestConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def store(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return config(root), harvest(config(root), progress=False)


def mtimes(path) -> dict[str, int]:
    return {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in sorted(os.listdir(path))}


@pytest.mark.slow
def test_harvest_writes_exact_tokens_and_true_activations(store):
    cfg, path = store
    m = read_manifest(path)
    assert m.tokens == TOKENS == sum(s["rows"] for s in m.shards)
    assert len(m.shards) == 5 and [s["rows"] for s in m.shards] == [124, 124, 124, 124, 104]
    assert (m.d, m.dtype, m.site, m.model) == (576, "float32", "resid_post.6", "smollm2-135m")
    assert m.revision.startswith("sha256:") and m.key == cfg.key() and path.endswith(cfg.key())
    verify_store(path)
    acts = torch.cat(list(iter_batches(path, 256, shuffle=False)))
    assert acts.shape == (TOKENS, 576)
    assert m.mean_norm == pytest.approx(acts.norm(dim=1).mean().item(), rel=1e-5)
    # the stored rows are the activations of the same contexts, BOS dropped, in context order
    lm = load_lm("smollm2-135m")
    ctx = tokenize_contexts(load_corpus("wiki-extracts"), lm.tokenizer, context_length=T, max_tokens=TOKENS,
                            split="train")
    rec = next(iter_records(path, TOKENS))
    assert torch.equal(rec["token_id"], ctx.input_ids[:, 1:].reshape(-1)[:TOKENS])
    assert rec["position"][:T].tolist() == list(range(1, T)) + [1] and rec["context_id"][-1] == 19
    assert rec["label"][0] == ctx.doc_labels[int(ctx.token_doc_ids[0, 1])]
    want = harvest_activations(lm, ctx.input_ids[18:20], "resid_post.6")[:, 1:].reshape(-1, 576)
    torch.testing.assert_close(acts[18 * (T - 1):], want[: TOKENS - 18 * (T - 1)], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rec["act"], acts)  # the record reader and the batch reader see the same rows


def test_second_harvest_does_no_lm_work(store, caplog):
    cfg, path = store
    before = mtimes(path)
    with caplog.at_level(logging.INFO, logger="orchestrator.harvest"):
        t0 = time.perf_counter()
        again = harvest(cfg, progress=False)
        elapsed = time.perf_counter() - t0
    assert again == path
    assert mtimes(path) == before  # nothing rewritten
    assert elapsed < 1.0  # loading the LM alone takes seconds
    assert "reusing complete store" in caplog.text


@pytest.mark.slow
def test_interrupted_and_corrupted_harvest_resumes_to_the_same_shards(store, tmp_path):
    cfg, path = store
    want = read_manifest(path).shards
    work = tmp_path / cfg.key()
    shutil.copytree(path, work)
    # interruption: no manifest, the last shard never written, shard 3 written but not its sidecar, a temp file
    for name in ("manifest.json", "shard-00004.parquet", "shard-00004.json", "shard-00003.json"):
        (work / name).unlink()
    (work / ".tmp-shard-00004.parquet-abc").write_bytes(b"partial")
    old = time.time() - 3600  # cut short by a crash long ago: older than a lease, so nobody can still write it
    os.utime(work / ".tmp-shard-00004.parquet-abc", (old, old))
    # and a shard corrupted on disk: the reader names it and says how to fix it
    data = bytearray((work / "shard-00002.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (work / "shard-00002.parquet").write_bytes(bytes(data))
    shutil.copy(os.path.join(path, "manifest.json"), work / "manifest.json")
    with pytest.raises(ShardError, match=r"shard-00002\.parquet is corrupt.*delete .*rerun the harvest"):
        verify_store(str(work))
    (work / "manifest.json").unlink()
    kept = {f: t for f, t in mtimes(work).items() if f.startswith(("shard-00000", "shard-00001"))}
    resumed = harvest(config(tmp_path), progress=False)
    assert resumed == str(work)
    assert read_manifest(resumed).shards == want  # same shards, same checksums as the uninterrupted harvest
    assert {f: t for f, t in mtimes(work).items() if f in kept} == kept  # complete shards were not recomputed
    assert not any(f.startswith(".tmp-") for f in os.listdir(work))
    verify_store(resumed)


@pytest.mark.slow
def test_a_harvest_into_a_log_prints_a_line_per_tenth_and_no_ray_data_dump(tmp_path):
    """Not a terminal (`ray job submit`, a file, a pipe): no carriage-return bar and none of Ray Data's progress
    dumps (a block of lines every 10 s), but a plain line per tenth of the tokens: 20 shards give at most 11."""
    cfg = config(tmp_path, shard_rows=T - 1)  # one context per shard: 20 shards
    proc = subprocess.run([sys.executable, "-c", LOGGED_HARVEST, cfg.model_dump_json()], cwd=REPO,
                          capture_output=True, timeout=600)
    log = (proc.stdout + proc.stderr).decode()  # bytes: text mode would turn a bar's \r into \n
    assert proc.returncode == 0, log[-3000:]
    assert len(read_manifest(str(tmp_path / cfg.key())).shards) == 20
    assert "\r" not in log
    assert "Running Dataset" not in log and "Total Progress" not in log, log[-3000:]
    lines = [line for line in log.split("\n") if line.startswith(f"harvest {cfg.site} train:")]
    assert 2 <= len(lines) <= 11, log[-3000:]
    percents = [int(re.search(r"\((\d+)%\)", line).group(1)) for line in lines]
    assert percents == sorted(set(percents)) and "600/600 tokens (100%)" in lines[-1]


def test_bad_inputs(ray_local, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        config(tmp_path, dtype="float64")
    with pytest.raises(ValueError, match="is not a site name"):
        config(tmp_path, site="resid_mid.3")
    with pytest.raises(ValueError, match=r"tokens\n  Input should be greater than or equal to 1"):
        config(tmp_path, tokens=0)
    with pytest.raises(ValueError, match=r"layer 30 is out of range.*30 layers"):
        harvest(config(tmp_path, site="resid_post.30"), progress=False)
    with pytest.raises(ValueError, match=r"text_column.*'body'.*columns are \['text', 'title'"):
        harvest(config(tmp_path, text_column="body"), progress=False)
    with pytest.raises(ValueError, match="fewer than"):
        harvest(config(tmp_path, tokens=10**8), progress=False)
    with pytest.raises(ValueError, match="corpus_field"):
        config(tmp_path, corpus_field="data..items")
    with pytest.raises(ValueError, match="text_unit"):
        config(tmp_path, text_unit="chapter")
    assert not any(p.name.endswith(".parquet") for p in tmp_path.rglob("*"))


@pytest.mark.slow
def test_txt_books_harvest_by_paragraph_and_split_by_book(ray_local, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for b in range(4):
        text = "\n\n".join(f"Book {b}, paragraph {p}: the river ran past the mill and on towards the sea."
                           for p in range(6))
        (books / f"book{b}.txt").write_text(text)
    seed = next(s for s in range(100) if {doc_split(d, 0.5, s) for d in range(4)} == {"train", "eval"})
    cfg = config(tmp_path / "shards", corpus=str(books), text_unit="paragraph", eval_fraction=0.5, seed=seed,
                 site="resid_post.2", tokens=2 * (T - 1))
    assert not store_complete(cfg)
    m = read_manifest(harvest(cfg, progress=False))
    assert store_complete(cfg)  # what the sweep checks to say the harvest was reused
    assert m.config["content"]["text_unit"] == "paragraph" and m.config["text_unit"] == "paragraph"
    rec = next(iter_records(str(tmp_path / "shards" / cfg.key()), m.tokens))
    docs = set(rec["doc_id"].tolist())
    assert docs and all(doc_split(d, 0.5, seed) == "train" for d in docs)  # whole books, train side only
    eos = load_tokenizer("smollm2-135m").eos_token_id
    assert (rec["token_id"] == eos).sum() >= 2  # paragraphs, not books, are the units joined by EOS
