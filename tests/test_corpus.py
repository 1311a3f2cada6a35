"""sae/corpus.py: embedded and local corpora, contexts, the by-document split and the input errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae.corpus import doc_split, load_corpus, tokenize_contexts
from sae.lm import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def wiki():
    return load_corpus("wiki-extracts")


def test_wiki_extracts(wiki):
    assert wiki.column_names == ["text", "label", "doc_id"]
    assert len(wiki) > 9000
    assert len(set(wiki["label"])) == 12 and "" not in set(wiki["label"])
    assert wiki["doc_id"][:3] == [0, 1, 2]


def test_contexts_shape_bos_and_labels(wiki, tok):
    c = tokenize_contexts(wiki, tok, context_length=32, max_tokens=31 * 6, split="train")
    assert c.input_ids.shape == (6, 32) and c.token_doc_ids.shape == (6, 32)
    assert (c.input_ids[:, 0] == tok.bos_token_id).all()
    assert (c.input_ids[:, 1:] == tok.eos_token_id).any()  # documents joined by EOS
    assert len(c.labels) == 6 and c.doc_ids.shape == (6,)
    for i in range(6):
        docs = c.token_doc_ids[i, 1:].tolist()
        assert int(c.doc_ids[i]) == max(set(docs), key=docs.count)  # majority document
        assert c.labels[i] == c.doc_labels[int(c.doc_ids[i])]
        assert set(c.token_labels(i)) <= set(c.doc_labels.values())
    again = tokenize_contexts(wiki, tok, context_length=32, max_tokens=31 * 6, split="train")
    assert torch.equal(again.input_ids, c.input_ids)  # deterministic
    other = tokenize_contexts(wiki, tok, context_length=32, max_tokens=31 * 6, split="train", seed=1)
    assert not torch.equal(other.input_ids, c.input_ids)


def test_train_and_eval_share_no_document(wiki, tok):
    kw = dict(context_length=64, max_tokens=63 * 40, eval_fraction=0.2)
    train = tokenize_contexts(wiki, tok, split="train", **kw)
    ev = tokenize_contexts(wiki, tok, split="eval", **kw)
    train_docs, eval_docs = set(train.token_doc_ids.unique().tolist()), set(ev.token_doc_ids.unique().tolist())
    assert train_docs and eval_docs and not train_docs & eval_docs
    assert all(doc_split(d, 0.2, 0) == "eval" for d in eval_docs)
    share = sum(doc_split(d, 0.2, 0) == "eval" for d in range(5000)) / 5000
    assert 0.17 < share < 0.23


def test_local_files(tmp_path, tok):
    rows = [{"body": f"Document number {i} talks about cats and dogs at length.", "cat": f"c{i % 2}"}
            for i in range(20)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "c.txt").write_text("\n".join(r["body"] for r in rows))
    for path in (tmp_path / "a.jsonl", tmp_path / "b.parquet"):
        ds = load_corpus(str(path), text_column="body", label_column="cat")
        assert len(ds) == 20 and set(ds["label"]) == {"c0", "c1"}
    txt = load_corpus(str(tmp_path / "t"))
    assert len(txt) == 20 and set(txt["label"]) == {""}
    c = tokenize_contexts(txt, tok, context_length=16, max_tokens=30, split="train", eval_fraction=0.1)
    assert c.input_ids.shape == (2, 16)


def test_bad_inputs(tmp_path, wiki, tok):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x y z"}))
    with pytest.raises(ValueError, match=r"text_column.*'text'.*columns are \['body'\]"):
        load_corpus(str(tmp_path / "a.jsonl"))
    with pytest.raises(ValueError, match=r"label_column.*'topic'"):
        load_corpus(str(tmp_path / "a.jsonl"), text_column="body", label_column="topic")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n" + json.dumps({"text": ""}))
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(tmp_path / "blank.jsonl"))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(tmp_path / "e.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus("./no/such/file.jsonl")
    with pytest.raises(ValueError, match="fewer than"):
        tokenize_contexts(load_corpus(str(tmp_path / "a.jsonl"), text_column="body"), tok, context_length=8,
                          max_tokens=100, split="train", eval_fraction=0.01)
    with pytest.raises(ValueError, match="split must be"):
        tokenize_contexts(wiki, tok, context_length=8, max_tokens=10, split="test")
    with pytest.raises(ValueError, match="context_length"):
        tokenize_contexts(wiki, tok, context_length=1, max_tokens=10)
    with pytest.raises(ValueError, match="eval_fraction"):
        tokenize_contexts(wiki, tok, context_length=8, max_tokens=10, eval_fraction=1.5)
