"""A byte-level corpus prepared offline from book texts the test gives (a fixture archive stands in for the registry
package), for tests of text training."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest


def prepare_books_corpus(root: Path, books: dict[str, str], validation: str, test: str) -> Path:
    """``root / "data"``: ``books`` (name -> text) prepared with the byte tokenizer; the books named ``validation``
    and ``test`` form those splits, the others the train split."""
    from titans.data import corpus

    archive = root / "books-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        for name, text in books.items():
            info = tarfile.TarInfo(f"books-1.0/texts/{name}_gut.txt")
            info.size = len(text.encode())
            t.addfile(info, io.BytesIO(text.encode()))
    source = corpus.Source("books", "books==1.0", "*/texts/*_gut.txt", corpus.parse_gutenberg_files,
                           validation=(validation,), test=(test,))
    patch = pytest.MonkeyPatch()
    patch.setattr(corpus, "fetch", lambda spec, **kwargs: archive)
    try:
        corpus.prepare(root / "data", tokenizer="bytes", sources=[source])
    finally:
        patch.undo()
    return root / "data"
