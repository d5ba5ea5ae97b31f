"""Synthetic tasks: documented format, determinism per (seed, index), task semantics."""

import pytest
import torch
from torch.utils.data import DataLoader

from titans.data.synthetic import (
    CopyTask,
    NeedleTask,
    PatternTask,
    RecallTask,
    SyntheticDataset,
    example_rng,
    make_task,
)

TASK_KWARGS = {
    "copy": dict(vocab_size=10, length=12, gap=3),
    "pattern": dict(vocab_size=10, seq_len=40, min_period=2, max_period=6),
    "needle": dict(vocab_size=40, seq_len=32),
    "recall": dict(vocab_size=64, seq_len=48, num_kv_pairs=6),
}


@pytest.mark.parametrize("name", sorted(TASK_KWARGS))
def test_format_and_next_token_targets(name):
    task = make_task(name, **TASK_KWARGS[name])
    for example in SyntheticDataset(task, 20, seed=1):
        inputs, targets, mask = example["inputs"], example["targets"], example["loss_mask"]
        assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.bool
        assert inputs.shape == targets.shape == mask.shape == (task.seq_len,)
        assert 0 <= int(inputs.min()) and int(inputs.max()) < task.vocab_size
        assert 0 <= int(targets.min()) and int(targets.max()) < task.vocab_size
        assert mask.any()
        unscored = ~mask[:-1]  # away from scored positions, targets are the next input
        assert torch.equal(targets[:-1][unscored], inputs[1:][unscored])


@pytest.mark.parametrize("name", sorted(TASK_KWARGS))
def test_deterministic_per_seed_and_index(name):
    task = make_task(name, **TASK_KWARGS[name])
    a, b = SyntheticDataset(task, 8, seed=5), SyntheticDataset(task, 8, seed=5)
    other = SyntheticDataset(task, 8, seed=6)
    late_first = b[7]  # access order must not matter
    for key in ("inputs", "targets", "loss_mask"):
        assert torch.equal(a[7][key], late_first[key])
        assert all(torch.equal(a[i][key], b[i][key]) for i in range(8))
    assert not all(torch.equal(a[i]["inputs"], other[i]["inputs"]) for i in range(8))
    assert not torch.equal(a[0]["inputs"], a[1]["inputs"])


def test_copy_scores_exactly_the_copy():
    task = CopyTask(vocab_size=10, length=12, gap=3)
    ex = SyntheticDataset(task, 1, seed=0)[0]
    assert task.seq_len == 27
    source = ex["inputs"][:12]
    assert int(source.max()) < 8  # content excludes the blank (8) and the delimiter (9)
    assert ex["inputs"][12:15].tolist() == [8, 8, 8] and int(ex["inputs"][15]) == 9
    assert ex["loss_mask"].nonzero().flatten().tolist() == list(range(15, 27))
    assert torch.equal(ex["targets"][ex["loss_mask"]], source)


def test_pattern_is_periodic_and_scored_once_determined():
    task = PatternTask(vocab_size=10, seq_len=40, min_period=2, max_period=6)
    periods = set()
    for ex in SyntheticDataset(task, 60, seed=2):
        stream = torch.cat([ex["inputs"], ex["targets"][-1:]])
        period = int(ex["loss_mask"].nonzero()[0]) + 1  # first scored target is stream[period]
        periods.add(period)
        assert torch.equal(stream[period:], stream[:-period])
        assert ex["loss_mask"][period - 1 :].all() and not ex["loss_mask"][: period - 1].any()
        # copying the token one period back solves every scored position
        oracle = stream[(1 + torch.arange(40) - period).clamp(min=0)]
        assert torch.equal(oracle[ex["loss_mask"]], ex["targets"][ex["loss_mask"]])
    assert periods == {2, 3, 4, 5, 6}


@pytest.mark.parametrize("answer", ["value", "position"])
def test_needle_answer_is_the_marked_token_or_its_position(answer):
    task = NeedleTask(vocab_size=40, seq_len=32, answer=answer)
    for ex in SyntheticDataset(task, 30, seed=3):
        inputs, pos = ex["inputs"], int(ex["needle_position"])
        assert (inputs == task.needle).nonzero().flatten().tolist() == [pos]
        assert int(inputs[-1]) == task.query and ex["loss_mask"].nonzero().flatten().tolist() == [31]
        expected = int(inputs[pos + 1]) if answer == "value" else pos
        assert int(ex["targets"][-1]) == expected


def test_needle_fixed_depth():
    positions = [int(SyntheticDataset(NeedleTask(seq_len=64, depth=d), 1)[0]["needle_position"]) for d in (0, 0.5, 1)]
    assert positions == [0, 30, 61]


def test_recall_follows_zoology_mqar():
    task = RecallTask(vocab_size=64, seq_len=48, num_kv_pairs=6, random_non_queries=False)
    for ex in SyntheticDataset(task, 30, seed=4):
        inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
        keys, values = inputs[0:12:2], inputs[1:12:2]
        assert len(set(keys.tolist())) == 6 and len(set(values.tolist())) == 6
        assert all(1 <= k < 32 for k in keys.tolist()) and all(32 <= v < 64 for v in values.tolist())
        binding = dict(zip(keys.tolist(), values.tolist()))
        queries = mask.nonzero().flatten()
        assert sorted(inputs[queries].tolist()) == sorted(binding)  # every key queried exactly once
        assert all(int(targets[q]) == binding[int(inputs[q])] for q in queries)
        assert all(q >= 12 and (q - 12) % 2 == 0 for q in queries.tolist())
        others = torch.ones(48, dtype=torch.bool)
        others[:12], others[queries] = False, False
        assert not inputs[others].any()  # Zoology's zero filler


def test_recall_power_law_puts_queries_near_the_pairs():
    def mean_query_offset(power_a):
        task = RecallTask(vocab_size=256, seq_len=128, num_kv_pairs=4, power_a=power_a)
        return torch.cat([ex["loss_mask"].nonzero().flatten() for ex in SyntheticDataset(task, 200)]).float().mean()

    assert mean_query_offset(0.01) < mean_query_offset(1.0) - 20  # uniform gaps average far later


def test_recall_distance_on_a_hand_computed_example():
    """Keys 4, 7, 5 at input positions 0, 2, 4; 7 is queried at 8, 5 at 10 and 4 at 14: distances 6, 6 and 14."""
    task = RecallTask(vocab_size=16, seq_len=16, num_kv_pairs=3, random_non_queries=False)
    ex = task.generate(example_rng(0, 0))
    assert ex["inputs"].tolist() == [4, 15, 7, 14, 5, 8, 0, 0, 7, 0, 5, 0, 0, 0, 4, 0]  # the tokens are unchanged
    assert ex["targets"][ex["loss_mask"]].tolist() == [14, 8, 15]
    expected = [-1] * 16
    expected[8], expected[10], expected[14] = 6, 6, 14
    assert ex["distance"].dtype == torch.int64 and ex["distance"].tolist() == expected


def test_recall_distance_points_at_the_key():
    task = RecallTask(vocab_size=256, seq_len=256, num_kv_pairs=32)
    for ex in SyntheticDataset(task, 20, seed=1):
        inputs, targets, mask, distance = ex["inputs"], ex["targets"], ex["loss_mask"], ex["distance"]
        assert torch.equal(distance >= 0, mask)  # -1 exactly on the unscored positions
        queries = mask.nonzero().flatten()
        keys = queries - distance[queries]
        assert (keys % 2 == 0).all() and (keys < 64).all()  # a key slot of the opening pairs
        assert torch.equal(inputs[keys], inputs[queries]) and torch.equal(inputs[keys + 1], targets[queries])


def test_random_filler_keeps_queries_and_answers():
    task = RecallTask(vocab_size=64, seq_len=48, num_kv_pairs=6, random_non_queries=True)
    ex = SyntheticDataset(task, 1, seed=9)[0]
    binding = dict(zip(ex["inputs"][0:12:2].tolist(), ex["inputs"][1:12:2].tolist()))
    queries = ex["loss_mask"].nonzero().flatten()
    assert all(binding[int(ex["inputs"][q])] == int(ex["targets"][q]) for q in queries)
    assert (ex["inputs"][12:] != 0).float().mean() > 0.8


def test_dataloader_batches():
    task = make_task("recall", **TASK_KWARGS["recall"])
    batch = next(iter(DataLoader(SyntheticDataset(task, 8), batch_size=4)))
    assert batch["inputs"].shape == batch["loss_mask"].shape == (4, 48)


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("sorting")
    with pytest.raises(ValueError, match="copy: set `length`"):
        make_task("copy", seq_len=10)
    with pytest.raises(ValueError, match="recall"):
        make_task("recall", vocab_size=64, seq_len=48, num_kv_pairs=13)
    with pytest.raises(ValueError, match="answer='position'"):
        make_task("needle", vocab_size=16, seq_len=64, answer="position")
    with pytest.raises(ValueError, match="pattern"):
        make_task("pattern", seq_len=8, max_period=8)
    with pytest.raises(ValueError, match="unexpected keyword"):
        make_task("needle", depths=0.5)
