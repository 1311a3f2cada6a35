"""Text corpora and their fixed-length token contexts.

A corpus is a `datasets.Dataset` with columns text, label (str, "" when none) and doc_id (int, the row in the
source). Sources: a hub dataset name (with split, text column and optional subset), local json / jsonl /
parquet / txt files (or a folder of them), or the embedded `wiki-extracts` (Wikipedia summaries whose `topic`
is the label, so probes have something to predict).

Contexts are cut from documents joined by the tokenizer's EOS (its separator), with BOS prepended at position 0
of every context. The train/eval split is by document (a seeded hash of doc_id), and each split is cut from
its own documents only, so no eval token is ever seen in training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sae.assets import wiki_extracts_path

EMBEDDED_CORPORA = ("wiki-extracts",)
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _wiki_extracts() -> Any:
    import datasets

    with open(wiki_extracts_path(), encoding="utf-8") as f:
        raw = json.load(f)  # one object keyed by title, not JSON lines
    records = [{"text": v.get("extract") or "", "title": v.get("title") or k, "description": v.get("description") or "",
                "topic": v.get("topic") or ""} for k, v in raw.items()]
    return datasets.Dataset.from_list(records)


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in path.rglob("*") if p.suffix in _FILE_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"corpus: folder {str(path)!r} holds no {'/'.join(_FILE_BUILDERS)} files")
    kinds = {_FILE_BUILDERS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"corpus: local files must all be one of json/jsonl, parquet or txt, got "
                         f"{sorted({p.suffix for p in files})}")
    return kinds.pop(), [str(p) for p in files]


def load_corpus(name: str = "wiki-extracts", *, split: str = "train", text_column: str = "text",
                label_column: str | None = None, subset: str | None = None) -> Any:
    """A Dataset with columns text, label, doc_id. `split` and `subset` select a hub dataset's split / config;
    local files form one split. For wiki-extracts the label defaults to the article's topic."""
    import datasets

    if name in EMBEDDED_CORPORA:
        ds = _wiki_extracts()
        label_column = label_column or "topic"
    else:
        path = Path(name).expanduser()
        if path.exists():
            builder, files = _local_files(path)
            if all(Path(f).stat().st_size == 0 for f in files):
                raise ValueError(f"corpus {name!r} is empty: its files hold no bytes")
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        elif Path(name).suffix in _FILE_BUILDERS or name.startswith(("/", "./", "../", "~")):
            raise ValueError(f"corpus: local path {name!r} does not exist; give an existing json/jsonl/parquet/txt "
                             f"file or folder, a Hugging Face dataset name or one of {EMBEDDED_CORPORA}")
        else:
            ds = datasets.load_dataset(name, subset, split=split)
    for field, col in (("text_column", text_column), ("label_column", label_column)):
        if col is not None and col not in ds.column_names:
            raise ValueError(f"{field}: column {col!r} is not in corpus {name!r}; its columns are {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"corpus {name!r} (split {split!r}) is empty: it has no rows")
    texts = ds[text_column]
    labels = ds[label_column] if label_column else [""] * len(texts)
    rows = [(i, t, "" if lab is None else str(lab)) for i, (t, lab) in enumerate(zip(texts, labels, strict=True))
            if isinstance(t, str) and t.strip()]
    if not rows:
        raise ValueError(f"corpus {name!r} (split {split!r}) is empty: column {text_column!r} holds no non-blank text")
    return datasets.Dataset.from_dict({"text": [r[1] for r in rows], "label": [r[2] for r in rows],
                                       "doc_id": [r[0] for r in rows]})


@dataclass
class Contexts:
    """Token contexts [N, T] with BOS at position 0, and where each token came from.

    doc_ids / labels: the document covering most of a context's tokens (ties: the earliest), per context.
    token_doc_ids: the document of every token (BOS takes its context's majority document).
    doc_labels: label of every document that appears.
    """

    input_ids: torch.Tensor
    doc_ids: torch.Tensor
    labels: list[str]
    token_doc_ids: torch.Tensor
    doc_labels: dict[int, str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def token_labels(self, i: int) -> list[str]:
        return [self.doc_labels[int(d)] for d in self.token_doc_ids[i]]


def doc_split(doc_id: int, eval_fraction: float, seed: int) -> Literal["train", "eval"]:
    """Deterministic per-document split (a keyed hash, identical across processes and machines)."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(h, "big") / 2**64 < eval_fraction else "train"


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(context start id, document separator id): BOS and EOS, falling back to EOS/SEP when a model has none."""
    bos = tokenizer.bos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if bos is None:
        bos = sep
    if bos is None:
        raise ValueError("tokenizer has no bos, eos or sep token to start contexts and separate documents")
    return int(bos), int(sep if sep is not None else bos)


def tokenize_contexts(dataset: Any, tokenizer: Any, *, context_length: int, max_tokens: int,
                      split: Literal["train", "eval"] = "train", eval_fraction: float = 0.1, seed: int = 0,
                      chunk_docs: int = 256) -> Contexts:
    """Cut ceil(max_tokens / (context_length - 1)) contexts of `context_length` tokens from the split's documents.

    max_tokens counts non-BOS tokens (what a harvest stores). Documents are visited in a seeded shuffled order
    (the embedded corpus is sorted by topic), joined with EOS, and each context is [BOS] + context_length - 1
    tokens of that stream. Raises if the split has too few tokens.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (BOS plus at least one token), got {context_length}")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    for col in ("text", "doc_id"):
        if col not in dataset.column_names:
            raise ValueError(f"dataset lacks column {col!r} (columns: {dataset.column_names}); build it with load_corpus")
    if len(dataset) == 0:
        raise ValueError("corpus is empty: the dataset has no documents")
    bos, sep = special_ids(tokenizer)
    span = context_length - 1
    n_ctx = -(-max_tokens // span)
    need = n_ctx * span
    doc_ids = dataset["doc_id"]
    labels = dataset["label"] if "label" in dataset.column_names else [""] * len(doc_ids)
    rows = [i for i, d in enumerate(doc_ids) if doc_split(int(d), eval_fraction, seed) == split]
    random.Random(seed).shuffle(rows)
    stream: list[int] = []
    owners: list[int] = []
    doc_labels: dict[int, str] = {}
    for start in range(0, len(rows), chunk_docs):
        chunk = rows[start: start + chunk_docs]
        encoded = tokenizer(dataset[chunk]["text"], add_special_tokens=False)["input_ids"]
        for i, ids in zip(chunk, encoded, strict=True):
            if not ids:
                continue
            doc = int(doc_ids[i])
            doc_labels[doc] = labels[i]
            stream.extend(ids)
            stream.append(sep)
            owners.extend([doc] * (len(ids) + 1))
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"corpus split {split!r} holds {len(stream)} tokens (of {len(rows)} documents), fewer than "
                         f"the {need} asked for ({n_ctx} contexts of {span} tokens); lower tokens or use a bigger corpus")
    body = torch.tensor(stream[:need], dtype=torch.long).view(n_ctx, span)
    owner = torch.tensor(owners[:need], dtype=torch.long).view(n_ctx, span)
    majority = []
    for row in owner.tolist():
        counts = Counter(row)
        top = max(counts.values())
        majority.append(next(d for d in row if counts[d] == top))
    maj = torch.tensor(majority, dtype=torch.long)
    input_ids = torch.cat([torch.full((n_ctx, 1), bos, dtype=torch.long), body], dim=1)
    token_doc_ids = torch.cat([maj[:, None], owner], dim=1)
    used = {int(d) for d in owner.unique()}
    return Contexts(input_ids=input_ids, doc_ids=maj, labels=[doc_labels[d] for d in majority],
                    token_doc_ids=token_doc_ids, doc_labels={d: doc_labels[d] for d in sorted(used)})
