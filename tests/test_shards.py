"""orchestrator/shards.py: the store format, its integrity checks and the streaming readers (no LM needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import orchestrator.shards as shards
from orchestrator.shards import (
    Manifest,
    ShardError,
    iter_batches,
    iter_records,
    load_shard,
    manifest_entry,
    read_manifest,
    verify_store,
    write_manifest,
    write_shard,
)

D, ROWS, N_SHARDS = 8, 50, 6
LABELS = ["arts", "science"]


def make_store(path, dtype="float32", n_shards=N_SHARDS) -> tuple[str, torch.Tensor]:
    """A store of N_SHARDS x ROWS rows whose token_id is the global row number (to track every row)."""
    gen = torch.Generator().manual_seed(0)
    act = torch.randn(n_shards * ROWS, D, generator=gen)
    infos = []
    for i in range(n_shards):
        rows = np.arange(i * ROWS, (i + 1) * ROWS)
        cols = {"token_id": rows.astype(np.int32), "context_id": (rows // 10).astype(np.int32),
                "position": (rows % 10 + 1).astype(np.int32), "doc_id": (rows // 25).astype(np.int64)}
        infos.append(write_shard(str(path), i, act[rows], dtype, cols, LABELS, (rows // 25 % 2).astype(np.int32),
                                 first_context=i * 5, n_contexts=5))
    m = Manifest(key="k", model="m", revision="r", site="resid_post.0", corpus="c", split="train",
                 tokens=n_shards * ROWS, d=D, dtype=dtype, mean_norm=sum(s["norm_sum"] for s in infos) / (n_shards * ROWS),
                 context_length=11, n_contexts=n_shards * 5, contexts_per_shard=5, labels=LABELS,
                 shards=[manifest_entry(s) for s in infos])
    write_manifest(str(path), m)
    return str(path), act


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_per_dtype(tmp_path, dtype):
    store, act = make_store(tmp_path, dtype, n_shards=2)
    m = read_manifest(store)
    assert m.dtype == dtype and m.tokens == 2 * ROWS and m.d == D
    got = load_shard(store, m, 1)
    assert got["act"].dtype == getattr(torch, dtype)
    assert torch.equal(got["act"], act[ROWS:].to(getattr(torch, dtype)))
    assert got["token_id"].tolist() == list(range(ROWS, 2 * ROWS))
    assert got["label"].tolist() == [(r // 25) % 2 for r in range(ROWS, 2 * ROWS)]
    verify_store(store)


def test_iter_batches_covers_every_row_once_per_epoch(tmp_path):
    store, act = make_store(tmp_path)
    batches = list(iter_batches(store, 64, columns=("act", "token_id"), seed=3, epochs=2, buffer_shards=2))
    ids = torch.cat([b["token_id"] for b in batches])
    n = N_SHARDS * ROWS
    assert sorted(ids[:n].tolist()) == list(range(n)) and sorted(ids[n:].tolist()) == list(range(n))
    assert ids[:n].tolist() != list(range(n)) and ids[:n].tolist() != ids[n:].tolist()  # shuffled, per epoch
    assert [len(b["act"]) for b in batches] == ([64] * 4 + [44]) * 2  # each epoch ends with its remainder
    assert torch.equal(torch.cat([b["act"] for b in batches])[:n], act[ids[:n]])
    again = list(iter_batches(store, 64, columns=("token_id",), seed=3, epochs=2, buffer_shards=2))
    assert torch.equal(torch.cat(again), ids)  # deterministic for a seed
    plain = list(iter_batches(store, 64, shuffle=False, drop_last=True, dtype=torch.float16))
    assert len(plain) == n // 64 and plain[0].dtype == torch.float16 and plain[0].shape == (64, D)
    assert torch.equal(plain[0], act[:64].half())


def test_memory_stays_within_the_shard_buffer(tmp_path, monkeypatch):
    store, _ = make_store(tmp_path)
    loads = []
    real = shards.load_shard
    monkeypatch.setattr(shards, "load_shard", lambda *a, **k: loads.append(a[2]) or real(*a, **k))
    it = iter_batches(store, 16, buffer_shards=2)
    next(it)
    assert len(loads) == 2  # only the first buffer of shards is read to start streaming
    rest = list(it)
    assert len(loads) == N_SHARDS and 1 + len(rest) == -(-N_SHARDS * ROWS // 16)


def test_iter_records(tmp_path):
    store, act = make_store(tmp_path, n_shards=2)
    recs = list(iter_records(store, 30))
    assert [len(r["label"]) for r in recs] == [30, 30, 30, 10]
    first = recs[0]
    assert torch.equal(first["act"], act[:30]) and first["position"][:3].tolist() == [1, 2, 3]
    assert first["label"][0] == "arts" and first["label"][29] == "science" and first["label_id"][29] == 1


def test_corrupt_shard_is_named_with_the_fix(tmp_path):
    store, _ = make_store(tmp_path, n_shards=3)
    shard = tmp_path / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00001\.parquet is corrupt: sha256.*delete .*shard-00001.*rerun"):
        list(iter_batches(store, 16, shuffle=False))
    with pytest.raises(ShardError, match=r"shard-00001\.parquet"):
        verify_store(store)
    m = read_manifest(store)
    m.d = D + 1
    write_manifest(store, m)  # a store whose vectors have the wrong width
    with pytest.raises(ShardError, match=r"shard-00000\.parquet holds vectors of width 8, the manifest says d=9"):
        list(iter_batches(store, 16, shuffle=False, verify=False))
    (tmp_path / "shard-00002.parquet").unlink()
    with pytest.raises(ShardError, match=r"shard-00002\.parquet is missing"):
        load_shard(store, m, 2)
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])  # cut short
    with pytest.raises(ShardError, match=r"manifest\.json is not valid JSON.*delete it and rerun the harvest"):
        read_manifest(store)
    manifest.write_text("[1, 2]")
    with pytest.raises(ShardError, match=r"manifest\.json holds a JSON list"):
        read_manifest(store)
    manifest.unlink()
    with pytest.raises(ShardError, match="no manifest.json.*run harvest"):
        read_manifest(store)


def test_bad_arguments(tmp_path):
    store, act = make_store(tmp_path, n_shards=1)
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batches(store, 0))
    with pytest.raises(ValueError, match="columns must be"):
        next(iter_batches(store, 4, columns=("activations",)))
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_shard(store, 5, act[:2], "float64", {}, LABELS, np.zeros(2, np.int32), 0, 1)


def test_shard_store_names_one_store_by_uri_and_travels_as_it(tmp_path):
    """ShardStore owns the filesystem, path and URI: a local store is named by its absolute path (so two
    spellings are one store), a URI keeps its scheme, and a pickled store (what a Ray actor receives) reopens
    the same files."""
    import pickle

    (tmp_path / "root").mkdir()
    path, _ = make_store(tmp_path / "root" / "key")
    store = shards.ShardStore.at(str(tmp_path / "root" / ".." / "root"), "key")
    assert store.uri == str((tmp_path / "root" / "key").resolve()) and store == shards.ShardStore(path)
    assert store.complete() is not None and store.has(shards.MANIFEST) and not store.has("nothing.json")
    assert store.lock_path == f"{store.path}.lock"
    assert shards.ShardStore.of(store) is store and shards.ShardStore.of(path) == store  # an open store is reused
    again = pickle.loads(pickle.dumps(store))
    assert again == store and again.manifest() == read_manifest(path)
    assert shards.ShardStore("mock://bucket/sweeps/key/").uri == "mock://bucket/sweeps/key"

    first = store.manifest().shards[0]["name"]
    (tmp_path / "root" / "key" / first).write_bytes(b"cut")  # resized: no longer complete, nothing raised
    assert store.complete() is None
    (tmp_path / "root" / "key" / shards.MANIFEST).unlink()
    with pytest.raises(ShardError, match="no manifest.json.*run harvest"):
        store.manifest()


def _write_format_1_shard(path, index: int, act: torch.Tensor, dtype: str) -> dict:
    """A shard as format 1 wrote it (act a fixed_size_list of floats, bf16 as uint16 bits): stores harvested
    before format 2 must still stream."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    stored = act.to(getattr(torch, dtype))
    flat = stored.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else stored.numpy()
    value_type = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}[dtype]
    rows = np.arange(index * ROWS, (index + 1) * ROWS)
    table = pa.table({
        "act": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=value_type), D),
        "token_id": pa.array(rows.astype(np.int32)), "context_id": pa.array((rows // 10).astype(np.int32)),
        "position": pa.array((rows % 10 + 1).astype(np.int32)), "doc_id": pa.array((rows // 25).astype(np.int64)),
        "label": pa.DictionaryArray.from_arrays(pa.array((rows // 25 % 2).astype(np.int32)), pa.array(LABELS)),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none")
    data = sink.getvalue().to_pybytes()
    name = shards.shard_name(index)
    (path / name).write_bytes(data)
    return {"name": name, "rows": ROWS, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "first_context": index * 5, "n_contexts": 5}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_format_1_store_still_streams(tmp_path, dtype):
    import pyarrow as pa
    import pyarrow.parquet as pq

    act = torch.randn(2 * ROWS, D, generator=torch.Generator().manual_seed(1))
    infos = [_write_format_1_shard(tmp_path, i, act[i * ROWS:(i + 1) * ROWS], dtype) for i in range(2)]
    write_manifest(str(tmp_path), Manifest(
        key="k", model="m", revision="r", site="resid_post.0", corpus="c", split="train", tokens=2 * ROWS, d=D,
        dtype=dtype, mean_norm=1.0, context_length=11, n_contexts=10, contexts_per_shard=5, labels=LABELS,
        shards=infos, format=1))
    recs = list(iter_records(str(tmp_path), 64))
    assert torch.equal(torch.cat([r["act"] for r in recs]), act.to(getattr(torch, dtype)).float())
    assert torch.cat([r["token_id"] for r in recs]).tolist() == list(range(2 * ROWS))
    verify_store(str(tmp_path))
    m = read_manifest(str(tmp_path))
    m.d = D + 1
    write_manifest(str(tmp_path), m)
    with pytest.raises(ShardError, match=r"holds vectors of width 8, the manifest says d=9"):
        load_shard(str(tmp_path), m, 0)
    legacy = pq.read_table(tmp_path / "shard-00000.parquet").column("act").chunk(0)
    sliced = shards._decode_act(pa.chunked_array([legacy.slice(2, 3)]), D, dtype)  # a view that starts mid-array
    assert torch.equal(sliced, act[2:5].to(getattr(torch, dtype)))
    m.format = 3
    write_manifest(str(tmp_path), m)
    with pytest.raises(ShardError, match=r"manifest format 3, this code reads 1 and 2; delete .* rerun the harvest"):
        read_manifest(str(tmp_path))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_shard_describes_itself_to_any_parquet_reader(tmp_path, dtype):
    """act is one fixed-length binary value per row, its field naming dtype and d: a reader without this code
    (pandas, Ray Data, DuckDB) decodes it with a reshape."""
    import pyarrow.parquet as pq

    store, act = make_store(tmp_path, dtype, n_shards=1)
    table = pq.read_table(tmp_path / "shard-00000.parquet")
    field = table.schema.field("act")
    assert field.type.byte_width == D * getattr(torch, dtype).itemsize
    assert field.metadata == {b"dtype": dtype.encode(), b"d": str(D).encode()}
    raw = np.frombuffer(b"".join(table.column("act").to_pylist()), dtype=np.uint8)
    decoded = torch.from_numpy(raw.copy()).view(getattr(torch, dtype)).view(-1, D)
    assert torch.equal(decoded, act.to(getattr(torch, dtype)))
    m = read_manifest(store)
    m.dtype = "float16" if dtype != "float16" else "bfloat16"  # a manifest that misreads the bytes' dtype
    write_manifest(store, m)
    with pytest.raises(ShardError, match=rf"holds {dtype} vectors, the manifest says {m.dtype}.*rerun the harvest"):
        load_shard(store, m, 0)


def test_a_stream_hashes_each_shard_once_and_shuffles_a_buffer_by_its_seeded_permutation(tmp_path, monkeypatch):
    """Epochs after the first read the same, already checked files; a buffer's batches are the concatenated
    shards under torch.randperm of the stream's generator (changing that would silently change every SAE)."""
    import hashlib
    import random

    store, act = make_store(tmp_path)
    hashed, real_sha256 = [], hashlib.sha256
    monkeypatch.setattr(shards.hashlib, "sha256", lambda data: hashed.append(1) or real_sha256(data))
    batches = list(iter_batches(store, 1000, columns=("token_id",), seed=5, epochs=3, buffer_shards=N_SHARDS))
    assert len(hashed) == N_SHARDS and len(batches) == 3
    order = list(range(N_SHARDS))
    random.Random(5 * 1_000_003 + 0).shuffle(order)
    concatenated = torch.cat([torch.arange(i * ROWS, (i + 1) * ROWS) for i in order])
    expected = concatenated[torch.randperm(N_SHARDS * ROWS, generator=torch.Generator().manual_seed(5))]
    assert torch.equal(batches[0], expected)
