"""Text corpora and their fixed-length token contexts.

A corpus is a `datasets.Dataset` with columns text, label (str, "" when none) and doc_id (int: the source
document, a row of a table or one .txt file; every text unit cut from it shares it). Sources: a hub dataset name
(with split, text column and optional subset), local json / jsonl / parquet / txt files (or a folder of them), or
the embedded `wiki-extracts` (Wikipedia summaries whose `topic` is the label, so probes have something to
predict). `CorpusOptions` says how a source's text is cut into units (`text_unit`) and where a JSON file keeps
its records (`corpus_field`).

Contexts are cut from text units joined by the tokenizer's EOS (its separator), with BOS prepended at position 0
of every context. The train/eval split is by document (a seeded hash of doc_id), never by unit, and each split is
cut from its own documents only, so no eval token is ever seen in training and no book is split across the two.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sae.assets import wiki_extracts_path
from sae.messages import name_list

EMBEDDED_CORPORA = ("wiki-extracts",)
EMBEDDED_LABELS: dict[str, str] = {"wiki-extracts": "topic"}  # the label column of a corpus that has one
TextUnit = Literal["line", "paragraph", "document"]
KEY_COLUMN = "key"  # the column a dict-of-records JSON file's keys go to
_SUFFIX_KINDS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


class CorpusOptions(BaseModel):
    """How a corpus's text is read: the one definition the sweep spec and the harvest config compose.

    text_unit is `sample_by` of `datasets`. Read line by line (the only way before this option), a folder of
    books became a quarter of a million 36-character "documents"; `document` is the default. Units are shuffled
    and joined by EOS into contexts; the train/eval split stays by document, so one book is never on both sides.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    text_unit: TextUnit = Field("document", description="what one text unit is: `document` a whole document (a .txt "
                                "file, a row of a table), `paragraph` its blank-line-separated paragraphs, `line` its "
                                "lines")
    corpus_field: str | None = Field(None, description="where a .json file keeps its records: a dotted path of keys "
                                     "such as `data` or `data.items` (`field=` of datasets); null: the top level")

    @field_validator("corpus_field")
    @classmethod
    def _field_path(cls, v: str | None) -> str | None:
        if v is not None and any(not part.strip() for part in v.split(".")):
            raise ValueError(f"a dotted path of keys such as 'data' or 'data.items' (or null for the top level) is "
                             f"needed, got {v!r}")
        return v


def default_label_column(name: str) -> str | None:
    """The label column a corpus brings (wiki-extracts: its topic); None for any other corpus."""
    return EMBEDDED_LABELS.get(name)


def options_key(name: str, options: CorpusOptions) -> dict[str, Any]:
    """The options that decide corpus `name`'s units, for a content-addressed store key.

    Only options off their defaults are named, so the keys of stores made before the options existed still name
    the same data. Local .txt corpora always name their text_unit: they were read line by line before, and a
    store of those lines must not be reused for the whole files now read by default.
    """
    defaults = {k: f.default for k, f in CorpusOptions.model_fields.items()}
    out = {k: v for k, v in options.model_dump().items() if v != defaults[k]}
    if _is_text_corpus(name):
        out["text_unit"] = options.text_unit
    return out


def _is_text_corpus(name: str) -> bool:
    if name in EMBEDDED_CORPORA:
        return False
    path = Path(name).expanduser()
    if path.is_dir():
        return any(p.suffix == ".txt" for p in path.rglob("*"))
    return path.suffix == ".txt" and path.is_file()


def split_units(text: str, unit: TextUnit) -> list[str]:
    """The non-blank units of one document: itself, its paragraphs (split on blank lines) or its lines."""
    if unit == "document":
        return [text] if text.strip() else []
    if unit == "line":
        parts = text.splitlines()
    elif unit == "paragraph":
        parts = [p.strip("\n") for p in _BLANK_LINES.split(text.replace("\r\n", "\n"))]
    else:
        raise ValueError(f"text_unit must be one of line, paragraph, document, got {unit!r}")
    return [p for p in parts if p.strip()]


@dataclass
class _Records:
    """Rows read here rather than by `datasets` (.txt and .json files), with the Dataset calls load_corpus uses."""

    records: list[dict[str, Any]]
    hint: str = ""  # said when a column is missing

    @property
    def column_names(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.records for k in r))

    def __getitem__(self, column: str) -> list[Any]:
        return [r.get(column) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


def _wiki_extracts() -> Any:
    import datasets

    with open(wiki_extracts_path(), encoding="utf-8") as f:
        raw = json.load(f)  # one object keyed by title, not JSON lines
    records = [{"text": v.get("extract") or "", "title": v.get("title") or k, "description": v.get("description") or "",
                "topic": v.get("topic") or ""} for k, v in raw.items()]
    return datasets.Dataset.from_list(records)


def _local_files(path: Path) -> tuple[str, list[Path]]:
    files = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIX_KINDS) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"corpus: folder {str(path)!r} holds no {'/'.join(_SUFFIX_KINDS)} files")
    kinds = {_SUFFIX_KINDS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"corpus: local files must all be one of json/jsonl, parquet or txt, got "
                         f"{name_list(sorted({p.suffix for p in files}))}")
    return kinds.pop(), files


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus: {str(file)!r} is not UTF-8 text ({err}); convert it to UTF-8 (e.g. iconv) or "
                         "move it out of the corpus") from None


def _json_records(files: list[Path], field: str | None) -> _Records:
    """Records of .json files (a list of records, a dict of records, or one record, at `field`) and .jsonl lines."""
    out = _Records([])
    for file in files:
        if file.suffix == ".jsonl":
            if field is not None:
                raise ValueError(f"corpus_field: {field!r} applies to .json files, but {str(file)!r} is JSON lines "
                                 "(one record per line already); remove corpus_field")
            for n, line in enumerate(_read_text(file).splitlines(), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"corpus: {str(file)!r} line {n} is not JSON: {err}") from None
                    out.records.append(_as_record(rec, f"{str(file)!r} line {n}"))
            continue
        try:
            data = json.loads(_read_text(file))
        except json.JSONDecodeError as err:
            raise ValueError(f"corpus: {str(file)!r} is not JSON: {err}") from None
        records, hint = _records_at(data, field, file)
        out.records.extend(records)
        out.hint = out.hint or hint
    return out


def _as_record(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"corpus: {where} is a JSON {type(value).__name__}, not a record; records are JSON objects "
                         'of columns such as {"text": "..."}')
    return value


def _records_at(data: Any, field: str | None, file: Path) -> tuple[list[dict[str, Any]], str]:
    """The records at `field` of one parsed .json file, and a hint for a missing column.

    A list holds one record per element. A mapping whose values are all records (`{title: {...}, ...}`, the
    layout of the wiki-extracts file) holds one record per value, with its key added as column `key` unless the
    record has that column already. Any other mapping is one record.
    """
    node = data
    parts = field.split(".") if field else []
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            at = ".".join(parts[:i]) or "the top level"
            has = f"keys {name_list(node)}" if isinstance(node, dict) else f"a {type(node).__name__}, no keys"
            raise ValueError(f"corpus_field: {str(file)!r} has no key {part!r} at {at} (it holds {has}); set "
                             "corpus_field to the dotted path of the records, e.g. data or data.items")
        node = node[part]
    where = f"{str(file)!r}" + (f" at {field!r}" if field else "")
    if isinstance(node, list):
        return [_as_record(r, f"{where} element {j}") for j, r in enumerate(node)], ""
    if not isinstance(node, dict):
        raise ValueError(f"{'corpus_field' if field else 'corpus'}: {where} holds a JSON {type(node).__name__}, not "
                         "records; point corpus_field at a list of records or a mapping of records")
    if node and all(isinstance(v, dict) for v in node.values()):
        return [v if KEY_COLUMN in v else {**v, KEY_COLUMN: k} for k, v in node.items()], ""
    nested = [k for k, v in node.items() if isinstance(v, list | dict)]
    hint = (f"; {where} was read as one record: if its records sit under a key, set corpus_field to it "
            f"(keys holding lists or mappings: {name_list(nested)})") if nested else ""
    return [node], hint


def _read_source(name: str, split: str, subset: str | None, options: CorpusOptions) -> Any:
    """The rows of a source, as a Dataset or `_Records` (column_names, [column], len)."""
    import datasets

    field = options.corpus_field
    if name in EMBEDDED_CORPORA:
        if field is not None:
            raise ValueError(f"corpus_field: {field!r} applies to local .json files, not to the embedded {name!r}; "
                             "remove corpus_field")
        return _wiki_extracts()
    path = Path(name).expanduser()
    if path.exists():
        kind, files = _local_files(path)
        if all(f.stat().st_size == 0 for f in files):
            raise ValueError(f"corpus {name!r} is empty: its files hold no bytes")
        if field is not None and not any(f.suffix == ".json" for f in files):
            raise ValueError(f"corpus_field: {field!r} applies to .json files, and corpus {name!r} has none; remove "
                             "corpus_field")
        if kind == "text":
            return _Records([{"text": _read_text(f)} for f in files])
        if kind == "json" and any(f.suffix == ".json" for f in files):
            return _json_records(files, field)
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    if Path(name).suffix in _SUFFIX_KINDS or name.startswith(("/", "./", "../", "~")):
        raise ValueError(f"corpus: local path {name!r} does not exist; give an existing json/jsonl/parquet/txt "
                         f"file or folder, a Hugging Face dataset name or one of {EMBEDDED_CORPORA}")
    if field is not None:
        raise ValueError(f"corpus_field: {field!r} applies to local .json files, not to the hub dataset {name!r}; "
                         "remove corpus_field")
    return datasets.load_dataset(name, subset, split=split)


def load_corpus(name: str = "wiki-extracts", *, split: str = "train", text_column: str = "text",
                label_column: str | None = None, subset: str | None = None,
                options: CorpusOptions = CorpusOptions()) -> Any:  # noqa: B008 - frozen, so one shared default is safe
    """A Dataset with columns text, label, doc_id: one row per text unit (`options.text_unit`).

    `split` and `subset` select a hub dataset's split / config; local files form one split. label_column None:
    the corpus's own label column if it has one (wiki-extracts: topic), else no labels.
    """
    import datasets

    ds = _read_source(name, split, subset, options)
    label_column = label_column or default_label_column(name)
    for field, col in (("text_column", text_column), ("label_column", label_column)):
        if col is not None and col not in ds.column_names:
            hint = getattr(ds, "hint", "")
            raise ValueError(f"{field}: column {col!r} is not in corpus {name!r}; its columns are "
                             f"{name_list(ds.column_names)}{hint}")
    if len(ds) == 0:
        raise ValueError(f"corpus {name!r} (split {split!r}) is empty: it has no rows")
    texts = ds[text_column]
    labels = ds[label_column] if label_column else [""] * len(texts)
    rows = [(i, unit, "" if lab is None else str(lab)) for i, (t, lab) in enumerate(zip(texts, labels, strict=True))
            if isinstance(t, str) for unit in split_units(t, options.text_unit)]
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

    max_tokens counts non-BOS tokens (what a harvest stores). The rows (text units) of the split's documents are
    visited in a seeded shuffled order (the embedded corpus is sorted by topic), joined with EOS, and each context
    is [BOS] + context_length - 1 tokens of that stream. Raises if the split has too few tokens.
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
            raise ValueError(f"dataset lacks column {col!r} (columns: {name_list(dataset.column_names)}); build it "
                             "with load_corpus")
    if len(dataset) == 0:
        raise ValueError("corpus is empty: the dataset has no documents")
    bos, sep = special_ids(tokenizer)
    span = context_length - 1
    n_ctx = -(-max_tokens // span)
    need = n_ctx * span
    doc_ids = dataset["doc_id"]
    labels = dataset["label"] if "label" in dataset.column_names else [""] * len(doc_ids)
    side: dict[int, str] = {}  # a document's side, computed once for all its units
    rows = [i for i, d in enumerate(doc_ids)
            if (side[d] if d in side else side.setdefault(d, doc_split(int(d), eval_fraction, seed))) == split]
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
        n_docs, all_docs = len({doc_ids[i] for i in rows}), len(side)
        raise ValueError(f"corpus split {split!r} holds {len(stream)} tokens ({n_docs} of the corpus's {all_docs} "
                         f"documents, {len(rows)} text units), fewer than the {need} asked for ({n_ctx} contexts of "
                         f"{span} tokens); lower tokens or use a bigger corpus. The split is by document (eval_fraction "
                         "of them go to eval), so a corpus of a few long documents (a handful of books) can leave one "
                         "side short: add documents or change eval_fraction")
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
