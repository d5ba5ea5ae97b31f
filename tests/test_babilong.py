"""BABILong: BABILong's answer scoring on hand-written outputs; facts hidden in order in background text of the
requested length, drawn only from the given books; determinism."""

from pathlib import Path

import numpy as np
import pytest
import torch
from nltk.tokenize.punkt import PunktSentenceTokenizer

from titans.data import corpus
from titans.data.babilong import (
    TASK_LABELS,
    BabilongGenerator,
    BackgroundSampler,
    compare_answers,
    context_length,
)
from titans.data.tokenizer import BPETokenizer, ByteTokenizer

ESSAYS = Path(__file__).parent / "fixtures" / "niah" / "essays"
BOOKS = {p.stem: p.read_text(encoding="utf-8") for p in sorted(ESSAYS.glob("*.txt"))}
LOCATIONS = TASK_LABELS["qa1"]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(BOOKS.values(), vocab_size=400)


@pytest.mark.parametrize(
    "target, output, question, labels, correct",
    [
        ("kitchen", "The kitchen.", "Where is Mary?", LOCATIONS, True),
        ("kitchen", "KITCHEN", "Where is Mary?", LOCATIONS, True),  # case-insensitive
        ("kitchen", "kitchen or office", "Where is Mary?", LOCATIONS, False),  # two labels: wrong
        ("kitchen", "office", "Where is Mary?", LOCATIONS, False),
        ("kitchen", "I am not sure. It is the kitchen", "Where is Mary?", LOCATIONS, False),  # first sentence only
        ("kitchen", "kitchen<context>the office", "Where is Mary?", LOCATIONS, True),  # cut at <context>
        ("kitchen", "kitchen <example> office", "Where is Mary?", LOCATIONS, True),
        # a label the question mentions is never counted: here "kitchen"
        ("office", "office, then the kitchen", "Where was the apple before the kitchen?", LOCATIONS, True),
        ("kitchen", "the kitchen", "Where was the apple before the kitchen?", LOCATIONS, False),
        ("Fred", "Fred gave it to Jeff", "Who gave the football to Jeff?", TASK_LABELS["qa5"], True),
        ("Fred", "Fred and Bill", "Who gave the football to Jeff?", TASK_LABELS["qa5"], False),
        ("football", "the football", "What did Fred give to Jeff?", TASK_LABELS["qa5"], True),
        ("bedroom", "bedrooms", "Where is John?", LOCATIONS, True),  # substring match, as BABILong
    ],
)
def test_compare_answers_like_babilong(target, output, question, labels, correct):
    assert compare_answers(target, output, question, labels) is correct


def test_named_lengths():
    assert [context_length(n) for n in ("0k", "1k", "4k", "1M")] == [0, 700, 3700, 999_700]
    with pytest.raises(ValueError, match="unknown BABILong length"):
        context_length("3k")


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa4", "qa5"])
@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_facts_hidden_in_order_at_exact_length(task, tokenizer, bpe):
    tok = ByteTokenizer() if tokenizer == "bytes" else bpe
    gen = BabilongGenerator(task, tok, list(BOOKS.values()))
    for length in (3000, 9000):
        s = gen.sample(length, seed=2, index=1)
        assert len(s.context_ids) == length
        assert s.context == tok.decode(s.context_ids.tolist()).strip()
        assert list(s.fact_positions) == sorted(s.fact_positions)
        assert list(s.fact_token_positions) == sorted(s.fact_token_positions)
        for fact, start in zip(s.facts, s.fact_token_positions):  # each fact, whole, where recorded
            fact_ids = tok.encode(" " + fact)
            assert s.context_ids[start : start + len(fact_ids)].tolist() == fact_ids
        found = [s.context.find(fact) for fact in s.facts]
        assert -1 not in found and found == sorted(found)
        assert s.answer in TASK_LABELS[task] or s.answer in {"Bill", "Fred", "Jeff", "Mary"}
        ids = s.token_ids
        assert ids[list(s.answer_positions)].tolist() == tok.encode(" " + s.answer)
        example = s.as_example()
        assert torch.equal(example["targets"][example["loss_mask"]], s.answer_ids)


def background_sentences(sample):
    """The context's sentences once the facts are taken out."""
    background = sample.context
    for fact in sample.facts:
        background = background.replace(fact, "")
    return PunktSentenceTokenizer().tokenize(background)


def test_background_comes_only_from_the_given_books():
    train, test = BOOKS["gardens"], BOOKS["trains"]
    sentences = background_sentences(BabilongGenerator("qa1", ByteTokenizer(), [train]).sample(4000, seed=0, index=3))
    assert len(sentences) > 20
    for sentence in sentences[:-1]:  # the last one may be cut to fit the length
        assert sentence in train and sentence not in test
    assert train.find(sentences[-1][:20]) >= 0


def test_zero_length_is_facts_only():
    tok = ByteTokenizer()
    s = BabilongGenerator("qa2", tok, list(BOOKS.values())).sample(0, seed=1, index=0)
    assert s.context == " ".join(s.facts) and set(s.fact_positions) == {0}


def test_deterministic_and_fact_limit(bpe):
    gen = BabilongGenerator("qa3", bpe, list(BOOKS.values()))
    a, b = gen.sample(1000, seed=4, index=2), gen.sample(1000, seed=4, index=2)
    assert torch.equal(a.context_ids, b.context_ids) and a.question == b.question
    assert not torch.equal(a.context_ids, gen.sample(1000, seed=4, index=3).context_ids)
    assert all(len(gen.sample(160, seed=0, index=i).facts) <= 20 for i in range(5))  # BABILong: length // 8


def test_sample_scores_generated_answers():
    s = BabilongGenerator("qa1", ByteTokenizer(), list(BOOKS.values())).sample(500, seed=0, index=0)
    wrong = next(label for label in LOCATIONS if label != s.answer and label not in s.question.lower())
    assert s.score(f"{s.answer}.") and not s.score(wrong) and not s.score(f"{s.answer} or {wrong}")


def test_sampler_reads_long_books_window_by_window():
    book = " ".join(f"Sentence number {i} is here and it is long enough." for i in range(20_000))  # ~1 MB
    sampler = BackgroundSampler([book], ByteTokenizer(), window_chars=5_000)
    sentences = sampler.sample(200_000, np.random.default_rng(0))
    assert sum(map(len, sentences)) == 200_000
    texts = [bytes(ids).decode() for ids in sentences[:-1]]
    assert all(t.startswith(" Sentence number ") and t.endswith(" is here and it is long enough.") for t in texts)
    numbers = [int(t.split()[2]) for t in texts]  # consecutive within each read: nothing lost at window edges
    assert sum(b == a + 1 for a, b in zip(numbers, numbers[1:])) >= len(numbers) - 20


def test_sampler_fills_a_few_tokens():
    """A context nearly filled by facts leaves the background a few tokens: the draw still finds whole sentences
    (it once read only 10 characters per token asked for, too few to hold one, and gave up after 1,000 draws)."""
    sampler = BackgroundSampler(list(BOOKS.values()), ByteTokenizer())
    rng = np.random.default_rng(0)
    for n_tokens in (1, 2, 5, 9, 30):
        assert sum(map(len, sampler.sample(n_tokens, rng))) == n_tokens


def test_train_and_test_backgrounds_come_from_the_corpus_splits(monkeypatch):
    splits = {"train": [BOOKS["gardens"]], "test": [BOOKS["trains"]]}
    monkeypatch.setattr(corpus, "background_documents", lambda split, data_dir=None: splits[split])
    for split, book in splits.items():
        sample = BabilongGenerator.from_corpus("qa1", ByteTokenizer(), split).sample(2000, seed=0, index=0)
        assert all(sentence in book[0] for sentence in background_sentences(sample)[:-1])


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="no background documents"):
        BabilongGenerator("qa1", ByteTokenizer(), ["  "])
    with pytest.raises(ValueError, match="unknown BABILong task"):
        BabilongGenerator("qa7", ByteTokenizer(), ["text."])
    with pytest.raises(ValueError, match="context_length"):
        BabilongGenerator("qa1", ByteTokenizer(), list(BOOKS.values())).sample(10)
    with pytest.raises(ValueError, match="no sentence"):
        BabilongGenerator("qa1", ByteTokenizer(), ["a. b. c. d."]).sample(100)
