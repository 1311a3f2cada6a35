"""sae/corpus.py: embedded and local corpora, contexts, the by-document split and the input errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae.corpus import CorpusOptions, doc_split, load_corpus, options_key, split_units, tokenize_contexts
from sae.lm import load_tokenizer
from sae.messages import name_list


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
    assert len(txt) == 1 and set(txt["label"]) == {""}  # one .txt file is one document by default
    assert len(load_corpus(str(tmp_path / "t"), options=CorpusOptions(text_unit="line"))) == 20
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


def write_books(folder) -> list[list[str]]:
    """Three .txt "books" of 2, 3 and 4 paragraphs, each paragraph two lines; returns their paragraphs."""
    folder.mkdir()
    books = []
    for b, n_par in enumerate((2, 3, 4)):
        pars = [f"Book {b} paragraph {p} opens with a sentence about rivers.\nIt ends on a second line about hills."
                for p in range(n_par)]
        (folder / f"book{b}.txt").write_text("\n\n".join(pars) + "\n")
        books.append(pars)
    return books


def units(folder, unit: str):
    return load_corpus(str(folder), options=CorpusOptions(text_unit=unit))


def test_txt_folder_text_units(tmp_path):
    books = write_books(tmp_path / "books")
    docs = units(tmp_path / "books", "document")  # the default
    assert len(docs) == 3 and docs["doc_id"] == [0, 1, 2]
    assert len(load_corpus(str(tmp_path / "books"))) == 3
    assert docs["text"][1] == (tmp_path / "books" / "book1.txt").read_text()
    pars = units(tmp_path / "books", "paragraph")
    assert pars["text"] == [p for book in books for p in book]  # 9 paragraphs, blank lines gone
    assert pars["doc_id"] == [0, 0, 1, 1, 1, 2, 2, 2, 2]  # each paragraph keeps its book as its document
    lines = units(tmp_path / "books", "line")
    assert len(lines) == 18 and lines["text"][:2] == books[0][0].split("\n")
    assert lines["doc_id"].count(2) == 8
    assert split_units("a\r\n\r\n \n\nb\n", "paragraph") == ["a", "b"]  # CRLF and runs of blank lines
    one = load_corpus(str(tmp_path / "books" / "book2.txt"), options=CorpusOptions(text_unit="paragraph"))
    assert len(one) == 4 and set(one["doc_id"]) == {0}


@pytest.mark.parametrize("unit", ["paragraph", "line", "document"])
def test_split_by_document_keeps_each_book_whole(tmp_path, tok, unit):
    write_books(tmp_path / "books")
    ds = units(tmp_path / "books", unit)
    seed = next(s for s in range(100) if {doc_split(d, 0.5, s) for d in range(3)} == {"train", "eval"})
    sides = {d: doc_split(d, 0.5, seed) for d in range(3)}
    kw = dict(context_length=8, max_tokens=14, eval_fraction=0.5, seed=seed)
    for split in ("train", "eval"):
        c = tokenize_contexts(ds, tok, split=split, **kw)
        assert {sides[d] for d in c.token_doc_ids.unique().tolist()} == {split}
    # every unit of a train book is on the train side and none of an eval book: books are not cut across
    in_train = {d for d in ds["doc_id"] if sides[d] == "train"}
    assert in_train and in_train != {0, 1, 2}


def test_few_books_short_split_says_why(tmp_path, tok):
    write_books(tmp_path / "books")
    ds = units(tmp_path / "books", "document")
    with pytest.raises(ValueError, match=r"0 of the corpus's 3 documents.*split is by document"):
        tokenize_contexts(ds, tok, split="eval", context_length=8, max_tokens=14, eval_fraction=0.01)


def test_json_dict_of_records(tmp_path):
    records = {"Rivers": {"title": "Rivers", "body": "Water flows downhill.", "cat": "geo"},
               "Hills": {"body": "Land rises here.", "cat": "geo"},
               "Cats": {"body": "They purr.", "cat": "zoo", "key": "own-key"}}
    (tmp_path / "d.json").write_text(json.dumps(records))
    ds = load_corpus(str(tmp_path / "d.json"), text_column="body", label_column="cat")
    assert ds["text"] == ["Water flows downhill.", "Land rises here.", "They purr."] and ds["doc_id"] == [0, 1, 2]
    assert ds["label"] == ["geo", "geo", "zoo"]
    # the key becomes column `key` (a record's own `key` wins), so it can serve as a label
    assert load_corpus(str(tmp_path / "d.json"), text_column="body", label_column="key")["label"] == \
        ["Rivers", "Hills", "own-key"]


def test_json_records_under_a_field(tmp_path):
    items = [{"text": f"Item {i} says something."} for i in range(5)]
    (tmp_path / "n.json").write_text(json.dumps({"version": 2, "data": {"count": 5, "items": items}}))
    ds = load_corpus(str(tmp_path / "n.json"), options=CorpusOptions(corpus_field="data.items"))
    assert len(ds) == 5 and ds["doc_id"] == list(range(5))
    (tmp_path / "top.json").write_text(json.dumps({"data": items}))
    assert len(load_corpus(str(tmp_path / "top.json"), options=CorpusOptions(corpus_field="data"))) == 5
    with pytest.raises(ValueError, match=r"text_column.*read as one record.*set corpus_field.*\['data'\]"):
        load_corpus(str(tmp_path / "n.json"))  # no field: one record, and the message says where records may be
    with pytest.raises(ValueError, match=r"^corpus_field: .* has no key 'itemz' at data \(it holds keys \['count'"):
        load_corpus(str(tmp_path / "n.json"), options=CorpusOptions(corpus_field="data.itemz"))
    with pytest.raises(ValueError, match=r"^corpus_field: .*not records"):
        load_corpus(str(tmp_path / "n.json"), options=CorpusOptions(corpus_field="version"))
    (tmp_path / "l.jsonl").write_text(json.dumps(items[0]))
    with pytest.raises(ValueError, match=r"^corpus_field: 'data' applies to \.json files"):
        load_corpus(str(tmp_path / "l.jsonl"), options=CorpusOptions(corpus_field="data"))
    with pytest.raises(ValueError, match=r"^corpus_field: 'data' applies to local \.json files"):
        load_corpus("wiki-extracts", options=CorpusOptions(corpus_field="data"))


def test_missing_column_error_lists_at_most_20_names(tmp_path):
    (tmp_path / "wide.json").write_text(json.dumps({f"Title {i}": f"text {i}" for i in range(6239)}))
    with pytest.raises(ValueError) as err:
        load_corpus(str(tmp_path / "wide.json"))
    msg = str(err.value)
    assert msg.count("'Title ") == 20 and "'Title 19'" in msg and "'Title 20'" not in msg
    assert "… and 6219 more]" in msg and len(msg) < 800
    assert name_list(["a", "b"]) == "['a', 'b']"
    assert name_list(range(25)) == f"[{', '.join(map(str, range(20)))}, … and 5 more]"


def test_options_key_names_only_what_changes_the_data(tmp_path):
    write_books(tmp_path / "books")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}))
    default = CorpusOptions()
    assert options_key("wiki-extracts", default) == {} and options_key(str(tmp_path / "a.jsonl"), default) == {}
    assert options_key(str(tmp_path / "a.jsonl"), CorpusOptions(text_unit="line")) == {"text_unit": "line"}
    # .txt corpora were read by line before text_unit existed: their key always names the unit
    assert options_key(str(tmp_path / "books"), default) == {"text_unit": "document"}
    assert options_key(str(tmp_path / "x.json"), CorpusOptions(corpus_field="data")) == {"corpus_field": "data"}
    with pytest.raises(ValueError, match=r"corpus_field\n.*a dotted path of keys"):
        CorpusOptions(corpus_field="data..items")
