"""The activation shard store: format, integrity checks and streaming readers.

A store is `<storage>/<key>/` on any filesystem pyarrow can open (local folder, s3://, gs://, hdfs://):

    plan.json               shard plan fixed when the harvest starts (contexts per shard), so a resume cuts
                            the same shards
    shard-00000.parquet     one row per harvested token (BOS positions dropped), one row group:
                              act fixed_size_binary[d x itemsize]: each row's d values in the storage dtype
                              (float32, float16 or bfloat16, little-endian; the field's metadata names the
                              dtype and d), token_id int32, context_id int32, position int32, doc_id int64,
                              label dictionary<string>
    shard-00000.json        sidecar {name, index, rows, bytes, sha256, norm_sum, first_context, n_contexts},
                            written after its shard: a shard without one is incomplete
    manifest.json           written last: the store is complete only when it exists

Beside it, `<storage>/<key>.lock` is the lease of the harvest writing the store (orchestrator/lease.py); it
exists only while a harvest runs, or after one crashed until the next takes it over.

Every file is written to a temp name and renamed. Readers check each shard's sha256 and shape as they load it
and stream a bounded buffer of shards, so memory stays flat however large the store grows.

Why fixed_size_binary, not fixed_size_list<float>: Parquet has no fixed-size list, so a list column is stored
with a repetition and a definition level per value, and decoding a 38 MB shard of them took 60 ms; the binary
column is one fixed-length value per row and decodes in 6 ms (the reads are the feed of every training step).
Stores of format 1 (the list column) are still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

MANIFEST = "manifest.json"
PLAN = "plan.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: act as fixed_size_list<float>[d] (still read, no longer written)
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
RECORD_COLUMNS = ("act", "token_id", "context_id", "position", "doc_id", "label")
MANIFEST_SHARD_KEYS = ("name", "rows", "bytes", "sha256", "first_context", "n_contexts")  # a sidecar's, in the manifest
log = logging.getLogger(__name__)


class ShardError(ValueError):
    """A shard (or the store around it) fails its integrity check."""


@dataclass
class Manifest:
    key: str
    model: str
    revision: str
    site: str
    corpus: str
    split: str
    tokens: int
    d: int
    dtype: str
    mean_norm: float
    context_length: int
    n_contexts: int
    contexts_per_shard: int
    labels: list[str]
    shards: list[dict[str, Any]]  # {name, rows, bytes, sha256, first_context, n_contexts}
    config: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def storage_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands."""
    uri = str(uri)
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    from pathlib import Path

    return pafs.LocalFileSystem(), Path(uri).expanduser().resolve().as_posix()


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.readall()


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a temp name beside `path`, then rename, so readers never see a partial file."""
    base, _, name = path.rpartition("/")
    tmp = f"{base}/.tmp-{name}-{random.getrandbits(48):012x}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """A JSON object of the store (manifest, plan, shard sidecar); a cut-short or corrupt one is named, with the fix."""
    try:
        value = json.loads(read_bytes(fs, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path} is not valid JSON ({err}): the file was cut short or corrupted; delete it and rerun "
                         "the harvest (complete shards are kept)") from None
    if not isinstance(value, dict):
        raise ShardError(f"{path} holds a JSON {type(value).__name__}, not an object; delete it and rerun the harvest")
    return value


class ShardStore:
    """One store, `<storage>/<key>`: the URI that names it (what a user reads and what travels to trials) and
    the pyarrow filesystem and path every read and write goes through, resolved once from that URI. Pickles as
    its URI, so a Ray actor or Tune trial reopens the same store on its own node."""

    def __init__(self, uri: str):
        uri = str(uri)
        self.fs, self.path = storage_fs(uri)
        self.uri = uri.rstrip("/") if "://" in uri else self.path  # a local store is named by its absolute path

    @classmethod
    def at(cls, storage: str, key: str) -> ShardStore:
        """The store of `key` under the storage root `storage` (a local folder or a URI)."""
        return cls(f"{str(storage).rstrip('/')}/{key}")

    @classmethod
    def of(cls, store: str | ShardStore) -> ShardStore:
        """`store` itself when it is one already (its filesystem stays open), else the store its URI names."""
        return store if isinstance(store, ShardStore) else cls(store)

    def __reduce__(self) -> tuple[Any, ...]:
        return ShardStore, (self.uri,)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ShardStore({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardStore) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def lock_path(self) -> str:
        """The harvest lease beside the store (orchestrator/lease.py)."""
        return f"{self.path}.lock"

    def file(self, name: str) -> str:
        return _join(self.path, name)

    def has(self, name: str) -> bool:
        return exists(self.fs, self.file(name))

    def read_bytes(self, name: str) -> bytes:
        return read_bytes(self.fs, self.file(name))

    def read_buffer(self, name: str) -> pa.Buffer:
        """The whole file in one read of its known size: 3 ms for a 38 MB shard, against 40 ms for read_bytes,
        whose stream grows its buffer chunk by chunk."""
        with self.fs.open_input_file(self.file(name)) as f:
            return f.read_buffer()

    def read_json(self, name: str) -> dict[str, Any]:
        return read_json(self.fs, self.file(name))

    def write(self, name: str, data: bytes) -> None:
        """Atomically (temp name, then rename), creating the store's folder if needed."""
        self.fs.create_dir(self.path, recursive=True)
        write_atomic(self.fs, self.file(name), data)

    def manifest(self) -> Manifest:
        """The manifest of a complete store; a missing or foreign-format one raises ShardError with the fix."""
        if not self.has(MANIFEST):
            raise ShardError(f"store {self} has no {MANIFEST}: the harvest is missing or unfinished; run harvest(cfg) "
                             f"(it resumes from the complete shards)")
        raw = self.read_json(MANIFEST)
        if raw.get("format") not in READABLE_FORMATS:
            raise ShardError(f"store {self} has manifest format {raw.get('format')}, this code reads "
                             f"{' and '.join(map(str, READABLE_FORMATS))}; delete {self} and rerun the harvest")
        return Manifest(**raw)

    def complete(self) -> Manifest | None:
        """The manifest if the store is complete: the manifest is there and every shard it lists has its recorded
        size (a cheap check, no hashing; readers verify each shard's sha256 as they load it)."""
        if not self.has(MANIFEST):
            return None
        m = self.manifest()
        for s in m.shards:
            if self.fs.get_file_info(self.file(s["name"])).size != s["bytes"]:
                log.warning("store %s: shard %s is missing or resized; it will be re-harvested", self, s["name"])
                return None
        return m


def encode_shard(act: torch.Tensor, dtype: str, columns: dict[str, np.ndarray], labels: Sequence[str],
                 label_idx: np.ndarray) -> bytes:
    """Parquet bytes of one shard. act [n, d] is already in the storage dtype; each row is stored as its d values'
    bytes (fixed_size_binary, so bf16 needs no stand-in type), the field's metadata naming dtype and d."""
    n, d = act.shape
    raw = act.contiguous().view(torch.uint8).numpy()  # [n, d * itemsize]: the values' bytes, row-major
    width = raw.shape[1]
    act_field = pa.field("act", pa.binary(width), nullable=False, metadata={"dtype": dtype, "d": str(d)})
    act_array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(raw)])
    fields, arrays = [act_field], [act_array]
    for name, values in columns.items():
        arrays.append(pa.array(values))
        fields.append(pa.field(name, arrays[-1].type))
    arrays.append(pa.DictionaryArray.from_arrays(pa.array(label_idx, pa.int32()), pa.array(list(labels), pa.string())))
    fields.append(pa.field("label", arrays[-1].type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none", row_group_size=max(n, 1), use_dictionary=["label"],
                   write_statistics=False)
    return sink.getvalue().to_pybytes()


def write_shard(store: str | ShardStore, index: int, act: torch.Tensor, dtype: str, columns: dict[str, np.ndarray],
                labels: Sequence[str], label_idx: np.ndarray, first_context: int, n_contexts: int,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write shard `index` and then its sidecar (both atomically; `extra` goes into the sidecar, e.g. timings);
    return the sidecar dict."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    store = ShardStore.of(store)
    data = encode_shard(act.to(getattr(torch, dtype)), dtype, columns, labels, label_idx)
    info = {"name": shard_name(index), "index": index, "rows": int(act.shape[0]), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "norm_sum": float(act.float().norm(dim=1).double().sum()),
            "first_context": first_context, "n_contexts": n_contexts, **(extra or {})}
    store.write(info["name"], data)
    store.write(sidecar_name(index), json.dumps(info).encode())
    return info


def manifest_entry(sidecar: dict[str, Any]) -> dict[str, Any]:
    """What the manifest lists of a shard: its sidecar without the harvest's extras (timings)."""
    return {k: sidecar[k] for k in MANIFEST_SHARD_KEYS}


def write_manifest(store: str | ShardStore, manifest: Manifest) -> None:
    """Written last: its presence marks the store complete."""
    ShardStore.of(store).write(MANIFEST, manifest.to_json().encode())


def _act_layout_error(field: pa.Field, d: int, dtype: str) -> str | None:
    """Why an act column does not hold d values of `dtype` per row, or None when it does (format 2: a
    fixed-size binary of d * itemsize bytes whose metadata, when present, names the same dtype and d; format 1: a
    fixed-size list of d values)."""
    itemsize = getattr(torch, dtype).itemsize
    if pa.types.is_fixed_size_binary(field.type):
        meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
        if "dtype" in meta and meta["dtype"] != dtype:
            return f"holds {meta['dtype']} vectors, the manifest says {dtype}"
        width, rest = divmod(field.type.byte_width, itemsize)
        if rest or width != d or meta.get("d", str(d)) != str(d):
            return f"holds vectors of width {meta.get('d', field.type.byte_width / itemsize)}, the manifest says d={d}"
        return None
    if pa.types.is_fixed_size_list(field.type):
        return None if field.type.list_size == d else \
            f"holds vectors of width {field.type.list_size}, the manifest says d={d}"
    return f"has an act column of type {field.type}, not a fixed-size binary or list"


def _decode_act(col: pa.ChunkedArray, d: int, dtype: str) -> torch.Tensor:
    """A read-only view of the shard's buffer (no copy, for a shard read whole): callers cat / index / convert,
    which copies."""
    if isinstance(col, pa.ChunkedArray):
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    else:
        arr = col
    torch_dtype = getattr(torch, dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if pa.types.is_fixed_size_binary(arr.type):
            width = arr.type.byte_width
            raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
            return torch.from_numpy(raw).view(torch_dtype).view(-1, d)
        # format 1: a list of floats (uint16 bits for bf16); flatten() honours a sliced array's offset
        values = arr.flatten().to_numpy(zero_copy_only=False)
        if dtype == "bfloat16":
            return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).view(-1, d)
        return torch.from_numpy(values).view(-1, d)


def read_manifest(store: str | ShardStore) -> Manifest:
    return ShardStore.of(store).manifest()


def _fix_hint(store: ShardStore, shard_path: str) -> str:
    return (f"Re-harvest it: delete {shard_path} and rerun the harvest with the same config (only missing shards "
            f"are recomputed), or delete the whole store {store} to start over.")


def load_shard(store: str | ShardStore, manifest: Manifest, index: int, columns: Sequence[str] = RECORD_COLUMNS,
               verify: bool = True) -> dict[str, torch.Tensor]:
    """One shard as tensors (act in the storage dtype; label as an index into manifest.labels), checked
    against the manifest's sha256, row count and d."""
    store = ShardStore.of(store)
    info = manifest.shards[index]
    spath = store.file(info["name"])
    try:
        data = store.read_buffer(info["name"])
    except (FileNotFoundError, OSError) as e:
        raise ShardError(f"shard {spath} is missing ({e}). {_fix_hint(store, spath)}") from e
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info["sha256"]:
            raise ShardError(f"shard {spath} is corrupt: sha256 {digest[:16]}... does not match the manifest's "
                             f"{info['sha256'][:16]}.... {_fix_hint(store, spath)}")
    try:
        table = pq.read_table(pa.BufferReader(data), columns=list(columns))
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"shard {spath} is unreadable ({e}). {_fix_hint(store, spath)}") from e
    if table.num_rows != info["rows"]:
        raise ShardError(f"shard {spath} has {table.num_rows} rows, the manifest says {info['rows']}. "
                         f"{_fix_hint(store, spath)}")
    out: dict[str, torch.Tensor] = {}
    for name in columns:
        col = table.column(name)
        if name == "act":
            wrong = _act_layout_error(table.schema.field(name), manifest.d, manifest.dtype)
            if wrong:
                raise ShardError(f"shard {spath} {wrong}. {_fix_hint(store, spath)}")
            out[name] = _decode_act(col, manifest.d, manifest.dtype)
        elif name == "label":
            arr = col.combine_chunks()
            arr = arr if pa.types.is_dictionary(arr.type) else arr.dictionary_encode()
            # parquet rebuilds each shard's dictionary in order of appearance: map it onto manifest.labels
            lut = torch.tensor([manifest.labels.index(s) for s in arr.dictionary.to_pylist()] or [0], dtype=torch.long)
            out[name] = lut[torch.from_numpy(arr.indices.to_numpy(zero_copy_only=False).astype(np.int64))]
        else:
            out[name] = torch.from_numpy(col.to_numpy().astype(np.int64))
    return out


def verify_store(store: str | ShardStore) -> None:
    """Check every shard's sha256, rows and width against the manifest; raise ShardError naming the first bad one."""
    store = ShardStore.of(store)
    m = store.manifest()
    for i in range(len(m.shards)):
        load_shard(store, m, i, columns=("act",))
    total = sum(s["rows"] for s in m.shards)
    if total != m.tokens:
        raise ShardError(f"store {store}: shards hold {total} rows, the manifest says {m.tokens} tokens; delete "
                         f"{store} and rerun the harvest")


def _shuffled(parts: list[dict[str, torch.Tensor]], columns: Sequence[str], gen: torch.Generator
              ) -> dict[str, torch.Tensor]:
    """torch.cat(parts)[perm] for a random perm, in one copy: each part's rows are written straight to their
    shuffled places (index_copy_ by the inverse permutation) instead of concatenated and then gathered."""
    sizes = [p[columns[0]].shape[0] for p in parts]
    n = sum(sizes)
    perm = torch.randperm(n, generator=gen)
    dest = torch.empty_like(perm)
    dest[perm] = torch.arange(n)
    out = {}
    for c in columns:
        first = parts[0][c]
        out[c] = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
        for p, rows in zip(parts, torch.split(dest, sizes), strict=True):
            out[c].index_copy_(0, rows, p[c])
    return out


def _stream(store: ShardStore, batch_size: int, columns: Sequence[str], shuffle: bool, seed: int, epochs: int,
            buffer_shards: int, drop_last: bool, verify: bool) -> Iterator[dict[str, torch.Tensor]]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if buffer_shards <= 0:
        raise ValueError(f"buffer_shards must be positive, got {buffer_shards}")
    bad = [c for c in columns if c not in RECORD_COLUMNS]
    if bad or not columns:
        raise ValueError(f"columns must be a non-empty subset of {RECORD_COLUMNS}, got {tuple(columns)}")
    m = store.manifest()
    gen = torch.Generator().manual_seed(seed)
    verified: set[int] = set()  # a shard's hash is checked when the stream first loads it, not every epoch
    for epoch in range(epochs):
        order = list(range(len(m.shards)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        carry: dict[str, torch.Tensor] | None = None
        for g in range(0, len(order), buffer_shards):
            group = order[g: g + buffer_shards]
            parts = [load_shard(store, m, i, columns, verify and i not in verified) for i in group]
            verified.update(group)
            if carry is not None:
                parts.insert(0, carry)
            buf = _shuffled(parts, columns, gen) if shuffle else {c: torch.cat([p[c] for p in parts]) for c in columns}
            n = buf[columns[0]].shape[0]
            full = n - n % batch_size
            for i in range(0, full, batch_size):
                yield {c: t[i: i + batch_size] for c, t in buf.items()}
            carry = {c: t[full:] for c, t in buf.items()}
        if carry is not None and carry[columns[0]].shape[0] > 0 and not drop_last:
            yield carry


def iter_batches(store: str | ShardStore, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", epochs: int = 1,
                 columns: Sequence[str] = ("act",), buffer_shards: int = 4, drop_last: bool = False,
                 verify: bool = True) -> Iterator[Any]:
    """Stream batches of activations [B, d] (`dtype`, on `device`), shuffled within a buffer of
    `buffer_shards` shards (shard order also shuffled per epoch), so memory is about buffer_shards shards however
    large the store. Each epoch ends with its remainder batch (< B rows) unless drop_last. Every shard's sha256
    and shape are checked as it loads (verify=False skips the hash). With several columns, yields dicts."""
    for batch in _stream(ShardStore.of(store), batch_size, tuple(columns), shuffle, seed, epochs, buffer_shards,
                         drop_last, verify):
        if "act" in batch:
            batch["act"] = batch["act"].to(device=device, dtype=dtype)
        if len(columns) == 1:
            yield batch[columns[0]].to(device)
        else:
            yield {k: v.to(device) for k, v in batch.items()}


def iter_records(store: str | ShardStore, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 dtype: torch.dtype = torch.float32, buffer_shards: int = 4) -> Iterator[dict[str, Any]]:
    """Every column, in store order by default: act [B, d] (`dtype`); token_id, context_id, position, doc_id,
    label_id (index into read_manifest(store).labels) as [B] int64 tensors; label as a list of B strings."""
    store = ShardStore.of(store)
    names = store.manifest().labels
    for batch in _stream(store, batch_size, RECORD_COLUMNS, shuffle, seed, 1, buffer_shards, False, True):
        batch["act"] = batch["act"].to(dtype)
        batch["label_id"] = batch.pop("label")
        batch["label"] = [names[i] for i in batch["label_id"].tolist()]
        yield batch
