"""Build the data of the offline lm-eval tasks from the text corpus (``titans data prepare``).

``python -m titans.harness.build_tasks OUT [--data-dir DIR] [--split test] [--cloze-per-doc 20] ...`` writes into OUT
the task configs of :data:`titans.harness.TASKS_DIR` and their data, built from the public-domain books of one
corpus split (the Wikipedia articles, CC BY-SA, are left out); ``--include_path OUT`` then evaluates on them. The
data shipped in the package is this command's output with its defaults on the test split (hamlet, much ado about
nothing, areopagitica, acts, judges: books no model of the corpus trains on).

* ``cloze.jsonl`` (task ``titans_corpus_cloze``, multiple choice): ``context`` is a run of consecutive sentences
  (Punkt, untrained), ``choices`` the true next sentence and three sentences of similar length from elsewhere in
  the same book, ``label`` the index of the true one.
* ``ppl.jsonl`` (task ``titans_corpus_ppl``, loglikelihood_rolling): ``text`` is a passage of whole paragraphs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from nltk.tokenize.punkt import PunktSentenceTokenizer

from titans.data.corpus import SOURCES, documents
from titans.fileio import atomic_write

__all__ = ["build", "cloze_items", "passages"]

_PUNKT = PunktSentenceTokenizer()
TASK_FILES = ("titans_corpus_cloze.yaml", "titans_corpus_ppl.yaml", "titans_tasks.py")


def _sentences(text: str) -> list[str]:
    return [" ".join(text[a:b].split()) for a, b in _PUNKT.span_tokenize(text)]


def cloze_items(doc_id: str, text: str, count: int, rng: random.Random, context_chars: int = 400,
                min_chars: int = 25, max_chars: int = 200) -> list[dict]:
    """``count`` multiple-choice items from one book (see the module docstring)."""
    sentences = _sentences(text)
    usable = [i for i, s in enumerate(sentences) if min_chars <= len(s) <= max_chars]
    items = []
    for answer in sorted(rng.sample(usable[len(usable) // 20:], min(count, len(usable) // 2))):
        start, chars = answer, 0
        while start > 0 and chars < context_chars:
            start -= 1
            chars += len(sentences[start]) + 1
        if chars < context_chars // 2:
            continue
        true = sentences[answer]
        near = [i for i in usable if abs(i - answer) > 50 and abs(len(sentences[i]) - len(true)) <= len(true) // 2
                and sentences[i] != true]
        if len(near) < 3:
            continue
        choices = [sentences[i] for i in rng.sample(near, 3)]
        label = rng.randrange(4)
        choices.insert(label, true)
        items.append({"id": f"{doc_id}#{answer}", "context": " ".join(sentences[start:answer]), "choices": choices,
                      "label": label})
    return items[:count]


def passages(doc_id: str, text: str, count: int, rng: random.Random, chars: int = 4000) -> list[dict]:
    """``count`` passages of whole paragraphs, about ``chars`` characters each, from one book."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    blocks, block = [], []
    for p in paragraphs:
        block.append(p)
        if sum(len(b) + 2 for b in block) >= chars:
            blocks.append("\n\n".join(block))
            block = []
    picked = sorted(rng.sample(range(1, len(blocks)), min(count, len(blocks) - 1))) if len(blocks) > 1 else []
    return [{"id": f"{doc_id}@{i}", "text": blocks[i]} for i in picked]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def build(out: Path, data_dir: Path | None = None, split: str = "test", cloze_per_doc: int = 20,
          ppl_per_doc: int = 2, passage_chars: int = 4000, seed: int = 0) -> dict[str, int]:
    """Write the task configs and ``cloze.jsonl`` / ``ppl.jsonl`` into ``out``; the number of records of each."""
    from titans.harness import TASKS_DIR

    public_domain = {s.name for s in SOURCES if s.license == "public domain"}
    books = [d for d in documents(split, data_dir) if d["source"] in public_domain]
    if not books:
        raise ValueError(f"the corpus's {split} split holds no public-domain book")
    cloze, ppl = [], []
    for doc in books:
        rng = random.Random(f"{seed}:{doc['id']}")
        cloze += cloze_items(doc["id"], doc["text"], cloze_per_doc, rng)
        ppl += passages(doc["id"], doc["text"], ppl_per_doc, rng, passage_chars)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != TASKS_DIR.resolve():
        for name in TASK_FILES:
            shutil.copyfile(TASKS_DIR / name, out / name)
    _write_jsonl(out / "cloze.jsonl", cloze)
    _write_jsonl(out / "ppl.jsonl", ppl)
    return {"cloze": len(cloze), "ppl": len(ppl)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titans.harness.build_tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for the task configs and data (--include_path)")
    p.add_argument("--data-dir", type=Path, help="the corpus (default: titans data prepare's)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--cloze-per-doc", type=int, default=20)
    p.add_argument("--ppl-per-doc", type=int, default=2)
    p.add_argument("--passage-chars", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    counts = build(a.out, a.data_dir, a.split, a.cloze_per_doc, a.ppl_per_doc, a.passage_chars, a.seed)
    print(f"{a.out}: {counts['cloze']} cloze items, {counts['ppl']} passages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
