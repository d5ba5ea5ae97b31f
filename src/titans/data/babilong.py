"""BABILong-style long-context reasoning (Kuratov et al. 2024): bAbI facts hidden in background books.

Recipe of ``booydar/babilong`` (``babilong_utils.py``: ``SentenceSampler``, ``NoiseInjectionDataset``;
``data/create_tasks.py``; ``metrics.py``), with facts from :mod:`titans.data.babi` (no registry ships bAbI) and
background from books the caller passes (PG-19 in the original; :meth:`BabilongGenerator.from_corpus` takes the
held-out books of :mod:`titans.data.corpus`, whose train and test splits are different books):

1. A bAbI sample (facts, question, answer); samples with more than ``context_length // 8`` facts are redrawn.
2. Background: from a random book and a random character offset, cut ``10 * budget`` characters, split them into
   sentences with nltk's untrained ``PunktSentenceTokenizer``, drop the first and last (partial) ones, keep those
   of at least ``min_sentence_len`` tokens, and repeat with another random book until ``budget = context_length -
   fact tokens`` tokens are reached; the last sentence is cut to the exact length.
3. Each fact goes before the background sentence at a position drawn uniformly (with replacement) from
   ``0..n_sentences``; positions are sorted, so the facts keep their order.

The context therefore has exactly ``context_length`` tokens (or only the facts' tokens when they need more, as at
length 0). Facts, sentences, question and answer are tokenised with a leading space (the original tokenises them
bare, which glues sentences together in the decoded text). Sentences are read in windows of ``window_chars``
characters, so a 1M-token sample tokenises about as much text as it uses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nltk.tokenize.punkt import PunktSentenceTokenizer

from titans.data import corpus
from titans.data.babi import TASKS, BabiSample, babi_sample

__all__ = [
    "TASK_LABELS",
    "LENGTHS",
    "PROMPT_RESERVE",
    "context_length",
    "preprocess_output",
    "compare_answers",
    "BackgroundSampler",
    "BabilongSample",
    "BabilongGenerator",
]

TASK_LABELS: dict[str, frozenset[str]] = {  # BABILong metrics.TASK_LABELS for qa1-qa5
    **{task: frozenset({"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}) for task in TASKS[:4]},
    "qa5": frozenset({"Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"}),
}
LENGTHS = {  # BABILong's length names -> message lengths in tokens (create_tasks.py)
    "0k": 0, "1k": 1000, "2k": 2000, "4k": 4000, "8k": 8000, "16k": 16000, "32k": 32000, "64k": 64000,
    "128k": 128000, "256k": 256000, "512k": 512000, "1M": 1_000_000,
}
PROMPT_RESERVE = 300  # tokens create_tasks.py keeps free for the prompt


def context_length(name: str) -> int:
    """Context tokens of a BABILong length name: the message length minus :data:`PROMPT_RESERVE` (0 for ``0k``)."""
    if name not in LENGTHS:
        raise ValueError(f"unknown BABILong length {name!r}; choose from {list(LENGTHS)}")
    return max(0, LENGTHS[name] - PROMPT_RESERVE)


def preprocess_output(output: str) -> str:
    """BABILong's ``preprocess_output``: lower-case, keep the first sentence, cut at ``<context>``/``<example>``.

    (The original also splits at ``'Question'`` after lower-casing, which never matches; it is left out.)
    """
    output = output.lower().split(".")[0]
    return output.split("<context>")[0].split("<example>")[0]


def compare_answers(target: str, output: str, question: str, task_labels: frozenset[str] | set[str]) -> bool:
    """BABILong's ``compare_answers``: correct iff ``target`` is the only task label in the output, not counting
    labels the question mentions (substring matches, case-insensitive)."""
    output = preprocess_output(output)
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    return target.lower() in in_output and len(in_output) == 1


_PUNKT = PunktSentenceTokenizer()  # untrained, as BABILong's SentenceSampler


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


class BackgroundSampler:
    """Background sentences from ``documents`` as token ids (BABILong's ``SentenceSampler`` with ``shuffle``)."""

    def __init__(self, documents: Sequence[str], tokenizer, *, min_sentence_len: int = 10, window_chars: int = 100_000):
        self.documents = [d for d in documents if d.strip()]
        if not self.documents:
            raise ValueError("no background documents (or only empty ones)")
        if min_sentence_len < 1 or window_chars < 1000:
            raise ValueError(f"need min_sentence_len >= 1 and window_chars >= 1000, "
                             f"got {min_sentence_len} and {window_chars}")
        self.tokenizer, self.min_sentence_len, self.window_chars = tokenizer, min_sentence_len, window_chars

    def _sentences(self, doc: str, start: int, end: int) -> Iterator[list[int]]:
        """Token ids of the sentences of ``doc[start:end]`` but its first and last, read window by window."""
        pos, first = start, True
        while pos < end:
            stop = min(end, pos + self.window_chars)
            spans = list(_PUNKT.span_tokenize(doc[pos:stop]))
            if stop < end and len(spans) > 1:  # the window's last sentence may be cut: read it again next time
                spans, next_pos = spans[:-1], pos + spans[-1][0]
            else:
                spans, next_pos = (spans[:-1] if stop == end else spans), stop
            if first:
                spans, first = spans[1:], False
            if spans:
                yield from _encode_all(self.tokenizer, [" " + doc[pos + a : pos + b] for a, b in spans])
            pos = next_pos

    def sample(self, n_tokens: int, rng: np.random.Generator) -> list[list[int]]:
        """Sentences totalling exactly ``n_tokens`` tokens (the last one cut), drawn with ``rng``."""
        out: list[list[int]] = []
        total, barren = 0, 0
        while total < n_tokens:
            doc = self.documents[int(rng.integers(len(self.documents)))]
            start = int(rng.integers(len(doc)))
            before = len(out)
            # ~10 characters a token, and never fewer than 1,000: a few tokens still need whole sentences to cut from
            for ids in self._sentences(doc, start, min(len(doc), start + 10 * max(n_tokens, 100))):
                if len(ids) >= self.min_sentence_len:
                    out.append(ids)
                    total += len(ids)
                    if total >= n_tokens:
                        break
            barren = barren + 1 if len(out) == before else 0
            if barren >= 1000:
                raise ValueError(f"the background documents yield no sentence of >= {self.min_sentence_len} tokens")
        if total > n_tokens:
            out[-1] = out[-1][: len(out[-1]) - (total - n_tokens)]
        return out


@dataclass(frozen=True, eq=False)
class BabilongSample:
    """A bAbI question over a long context.

    ``context_ids`` are the context's tokens (``context`` is their decoding); the model reads the context then
    ``question_ids`` and should answer ``answer_ids``. ``fact_positions`` are BABILong's (the background sentence
    each fact precedes) and ``fact_token_positions`` where each fact starts in ``context_ids``.
    """

    task: str
    facts: tuple[str, ...]
    question: str
    answer: str
    references: tuple[str, ...]
    context: str
    context_ids: torch.Tensor
    question_ids: torch.Tensor
    answer_ids: torch.Tensor
    fact_positions: tuple[int, ...]
    fact_token_positions: tuple[int, ...]

    @property
    def token_ids(self) -> torch.Tensor:
        """Context, question and answer tokens, for teacher forcing."""
        return torch.cat([self.context_ids, self.question_ids, self.answer_ids])

    @property
    def answer_positions(self) -> range:
        start = len(self.context_ids) + len(self.question_ids)
        return range(start, start + len(self.answer_ids))

    def as_example(self) -> dict[str, torch.Tensor]:
        """Teacher-forcing example in the :mod:`titans.data.synthetic` format: only the answer is scored."""
        ids = self.token_ids
        loss_mask = torch.zeros(len(ids) - 1, dtype=torch.bool)
        loss_mask[self.answer_positions.start - 1 :] = True
        return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask}

    def score(self, output: str) -> bool:
        """BABILong's verdict on a generated answer."""
        return compare_answers(self.answer, output, self.question, TASK_LABELS[self.task])


def _long(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


class BabilongGenerator:
    """BABILong samples of one bAbI task (``qa1``..``qa5``) over the given background documents."""

    def __init__(self, task: str, tokenizer, background: Sequence[str], *, min_sentence_len: int = 10):
        if task not in TASKS:
            raise ValueError(f"unknown BABILong task {task!r}; choose from {TASKS}")
        self.task, self.tokenizer = task, tokenizer
        self.sampler = BackgroundSampler(background, tokenizer, min_sentence_len=min_sentence_len)

    @classmethod
    def from_corpus(cls, task: str, tokenizer, split: str, data_dir: Path | None = None, **kwargs) -> BabilongGenerator:
        """Background from the books of a :mod:`titans.data.corpus` split (``"train"`` for training samples,
        ``"test"`` or ``"validation"`` for evaluation: different books). The corpus must have been prepared."""
        return cls(task, tokenizer, corpus.background_documents(split, data_dir), **kwargs)

    def sample(self, context_length: int, *, seed: int = 0, index: int = 0,
               max_facts: int | None = None) -> BabilongSample:
        """Sample ``index`` of ``seed`` with a context of ``context_length`` tokens (see :func:`context_length`
        for BABILong's named lengths). Deterministic in ``(task, context_length, seed, index, max_facts)``.
        ``max_facts``: at most this many facts (default BABILong's ``context_length // 8``)."""
        if context_length != 0 and context_length < 16:
            raise ValueError(f"context_length must be 0 (facts only) or >= 16, got {context_length}")
        facts_limit = context_length // 8 if context_length > 0 else None  # BABILong's max_n_facts
        facts_limit = facts_limit if max_facts is None else max_facts
        babi: BabiSample = babi_sample(self.task, seed, index, max_facts=facts_limit)
        rng = np.random.default_rng([seed, index, context_length])
        enc = self.tokenizer.encode
        fact_ids = _encode_all(self.tokenizer, [" " + f for f in babi.facts])
        budget = max(0, context_length - sum(len(f) for f in fact_ids))
        background = self.sampler.sample(budget, rng) if budget > 0 else []
        positions = np.sort(rng.choice(len(background) + 1, size=len(fact_ids)))

        ids: list[int] = []
        fact_starts: list[int] = []
        facts = iter(zip(positions, fact_ids))
        pending = next(facts, None)
        for i in range(len(background) + 1):
            while pending is not None and pending[0] == i:
                fact_starts.append(len(ids))
                ids.extend(pending[1])
                pending = next(facts, None)
            if i < len(background):
                ids.extend(background[i])
        return BabilongSample(
            task=self.task, facts=babi.facts, question=babi.question, answer=babi.answer,
            references=babi.references, context=self.tokenizer.decode(ids).strip(), context_ids=_long(ids),
            question_ids=_long(enc(" " + babi.question)), answer_ids=_long(enc(" " + babi.answer)),
            fact_positions=tuple(int(p) for p in positions), fact_token_positions=tuple(fact_starts),
        )
