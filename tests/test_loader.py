"""Loaders: exact windows, determinism, exact resume, disjoint DDP shards, documents read side by side in consecutive
segments."""

import itertools

import numpy as np
import pytest
import torch

from titans.data.loader import IGNORE_INDEX, DocumentSegments, RandomWindows, TokenStream


def positions_stream(lengths: list[int]) -> TokenStream:
    """Token value = position in the stream, so every token says where it came from."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenStream.from_arrays(np.arange(offsets[-1], dtype=np.uint16), offsets, vocab_size=1 << 16)


def test_token_stream_validates_offsets():
    with pytest.raises(ValueError, match="offsets"):
        TokenStream.from_arrays(np.arange(10), np.array([0, 5, 9]), vocab_size=10)
    stream = positions_stream([3, 0, 4])
    assert stream.num_documents == 3 and len(stream) == 7
    assert stream.document(2).tolist() == [3, 4, 5, 6] and len(stream.document(1)) == 0


# ------------------------------------------------------------------------------------------ RandomWindows
def take(loader, n):
    return [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in batch)
            for batch in itertools.islice(loader, n)]


def test_windows_are_exact_slices_of_the_stream():
    stream = positions_stream([1000, 2000, 1003])
    tokens = torch.from_numpy(stream.tokens.astype(np.int64))
    for inputs, targets in take(RandomWindows(stream, seq_len=31, batch_size=4, seed=1), 10):
        assert inputs.shape == targets.shape == (4, 31) and inputs.dtype == torch.int64
        for row_in, row_tgt in zip(inputs, targets):
            start = int(row_in[0])
            assert torch.equal(row_in, tokens[start:start + 31]) and torch.equal(row_tgt, tokens[start + 1:start + 32])


def test_windows_deterministic_per_seed_and_cover_an_epoch_without_overlap():
    stream = positions_stream([5000])
    loader = RandomWindows(stream, seq_len=15, batch_size=8, seed=3)
    epoch = take(loader, loader.batches_per_epoch)
    again = take(RandomWindows(stream, seq_len=15, batch_size=8, seed=3), loader.batches_per_epoch)
    other = take(RandomWindows(stream, seq_len=15, batch_size=8, seed=4), 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch, again))
    assert not torch.equal(epoch[0][0], other[0][0])
    starts = np.sort(np.concatenate([x[:, 0].numpy() for x, _ in epoch]))
    assert np.all(np.diff(starts) >= 16)  # windows of one epoch never overlap
    assert len(starts) == loader.batches_per_epoch * 8 >= 5000 // 16 - 8  # and nearly cover the stream
    assert loader.epoch == 1 and not torch.equal(take(loader, 1)[0][0], epoch[0][0])  # a new shuffle


def test_windows_resume_exactly_from_state_dict():
    stream = positions_stream([3000])
    loader = RandomWindows(stream, seq_len=20, batch_size=5, seed=7)
    reference = take(loader, 3 * loader.batches_per_epoch)
    for stop in (1, loader.batches_per_epoch - 1, loader.batches_per_epoch + 2):  # including across epochs
        first = RandomWindows(stream, seq_len=20, batch_size=5, seed=7)
        take(first, stop)
        state = first.state_dict()
        resumed = RandomWindows(stream, seq_len=20, batch_size=5, seed=7)
        resumed.load_state_dict(dict(state))
        for (x, y), (rx, ry) in zip(take(resumed, 6), reference[stop:stop + 6]):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(ValueError, match="different configuration"):
        RandomWindows(stream, seq_len=20, batch_size=5, seed=8).load_state_dict(state)


def test_windows_ddp_shards_are_disjoint_and_equal_length():
    stream = positions_stream([4000])
    loaders = [RandomWindows(stream, seq_len=9, batch_size=4, seed=0, rank=r, world_size=3) for r in range(3)]
    assert len({lo.batches_per_epoch for lo in loaders}) == 1
    starts = [set(np.concatenate([x[:, 0].numpy() for x, _ in take(lo, lo.batches_per_epoch)]).tolist())
              for lo in loaders]
    assert not (starts[0] & starts[1]) and not (starts[0] & starts[2]) and not (starts[1] & starts[2])
    every = np.sort(np.concatenate([list(s) for s in starts]))
    assert np.all(np.diff(every) >= 10)  # no token is read by two ranks in an epoch


def test_windows_reject_bad_arguments():
    stream = positions_stream([100])
    with pytest.raises(ValueError, match="too short"):
        RandomWindows(stream, seq_len=60, batch_size=1)
    with pytest.raises(ValueError, match="rank"):
        RandomWindows(stream, seq_len=4, batch_size=1, rank=2, world_size=2)


# --------------------------------------------------------------------------------------- DocumentSegments
LENGTHS = [50, 7, 120, 1, 33, 64, 2, 90]


def read_one_pass(loader):
    """Replay a loop=False pass: per document, the concatenated targets of its segments; and the groups read."""
    stream, rebuilt, current, groups = loader.stream, {}, [None] * loader.batch_size, []
    starts = np.asarray(stream.offsets[:-1])
    for inputs, targets, new_document in loader:
        assert isinstance(new_document, bool)
        if new_document:
            groups.append(set())
        for b in range(loader.batch_size):
            valid = targets[b] != IGNORE_INDEX
            if new_document:
                current[b] = None
                if valid.any():  # a new document starts at its first token
                    current[b] = int(np.searchsorted(starts, int(inputs[b, 0]), side="right") - 1)
                    assert int(inputs[b, 0]) == starts[current[b]] and current[b] not in rebuilt
                    rebuilt[current[b]] = []
                    groups[-1].add(current[b])
            elif valid.any():  # a continuation starts exactly where the previous segment stopped
                assert int(inputs[b, 0]) == rebuilt[current[b]][-1]
            else:  # the row's document has ended: padding until the group's longest one does
                assert current[b] is None or len(rebuilt[current[b]]) == LENGTHS[current[b]] - 1
            assert torch.equal(targets[b][valid], inputs[b][valid] + 1)  # positions: target = next token
            assert torch.all(inputs[b][~valid] == 0) and valid.tolist() == sorted(valid.tolist(), reverse=True)
            if valid.any():
                rebuilt[current[b]].extend(targets[b][valid].tolist())
    return rebuilt, groups


@pytest.mark.parametrize("shuffle", [False, True])
def test_segments_walk_each_document_consecutively_once(shuffle):
    stream = positions_stream(LENGTHS)
    loader = DocumentSegments(stream, seq_len=16, batch_size=3, seed=5, shuffle=shuffle, loop=False)
    rebuilt, groups = read_one_pass(loader)
    expected = {d: stream.document(d)[1:].tolist() for d in range(len(LENGTHS)) if LENGTHS[d] >= 2}
    assert rebuilt == expected  # every document, targets tiling it exactly once
    assert sorted(len(g) for g in groups) == [1, 3, 3]  # seven documents with targets, three side by side
    if not shuffle:
        assert groups == [{0, 1, 2}, {4, 5, 6}, {7}]  # in order, document 3 (one token, no target) skipped


def test_segments_group_documents_of_similar_length():
    """Shuffled documents are sorted by length within runs of groups, so a group pads little."""
    lengths = [int(n) for n in np.random.default_rng(0).integers(2, 400, 96)]
    stream = positions_stream(lengths)
    loader = DocumentSegments(stream, seq_len=8, batch_size=4, seed=1, loop=False)
    padded = sum(int((t == IGNORE_INDEX).sum()) for _, t, _ in loader)
    in_order = DocumentSegments(stream, seq_len=8, batch_size=4, shuffle=False, loop=False)
    assert padded < 0.25 * sum(int((t == IGNORE_INDEX).sum()) for _, t, _ in in_order)


def test_segments_deterministic_and_resume_exactly():
    stream = positions_stream(LENGTHS)
    make = lambda seed: DocumentSegments(stream, seq_len=10, batch_size=3, seed=seed)  # noqa: E731
    reference = take(make(1), 40)  # loops over several epochs
    assert all(torch.equal(x[0], y[0]) and x[2] == y[2] for x, y in zip(reference, take(make(1), 40)))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(reference, take(make(2), 40)))
    first = make(1)
    take(first, 13)
    resumed = make(1)
    resumed.load_state_dict(first.state_dict())
    for got, want in zip(take(resumed, 27), reference[13:]):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    with pytest.raises(ValueError, match="different configuration"):
        DocumentSegments(stream, seq_len=10, batch_size=2, seed=1).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="invalid loader position"):
        make(1).load_state_dict({**first.state_dict(), "segment": 99})


def test_segments_flag_new_documents_and_pad():
    stream = positions_stream([5, 3, 2])
    loader = DocumentSegments(stream, seq_len=3, batch_size=2, shuffle=False, loop=False)
    steps = [(x.tolist(), y.tolist(), n) for x, y, n in loader]
    assert steps == [
        ([[0, 1, 2], [5, 6, 0]], [[1, 2, 3], [6, 7, IGNORE_INDEX]], True),
        ([[3, 0, 0], [0, 0, 0]], [[4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 3], False),
        ([[8, 0, 0], [0, 0, 0]], [[9, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 3], True),  # a group of one
    ]
