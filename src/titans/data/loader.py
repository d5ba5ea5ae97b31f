"""Loaders over the memory-mapped token streams written by :func:`titans.data.corpus.prepare`.

* :class:`RandomWindows`: shuffled contiguous windows of ``seq_len + 1`` tokens for ordinary LM training.
* :class:`DocumentSegments`: ``batch_size`` documents read side by side one segment at a time, so that a
  recurrent/memory state can be carried from one batch to the next (the Titans long-term memory, Section 3, is
  updated at test time segment by segment); training uses it with ``data.sampling: documents``.

Both are deterministic per seed and resumable exactly from a small ``state_dict()``. :class:`RandomWindows` is also
shardable by ``(rank, world_size)``; training reads the global batch of either and keeps each rank's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from titans.data.corpus import SPLITS, default_data_dir, load_manifest, verify

__all__ = ["TokenStream", "RandomWindows", "DocumentSegments", "Segments", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # target value of padding (torch.nn.functional.cross_entropy's default ignore_index)


class TokenStream:
    """The token ids of one split (a read-only ``np.memmap``) and its document boundaries.

    Document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    vocab_size: int
    tokenizer_path: Path | None

    def __init__(self, data_dir: Path | None = None, split: str = "train", tokenizer_name: str = "bpe8k"):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
        data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        manifest = load_manifest(data_dir)
        if tokenizer_name not in manifest.tokenizers:
            raise ValueError(f"the corpus in {data_dir} has no {tokenizer_name!r} tokens "
                             f"(has {sorted(manifest.tokenizers)}): run prepare(tokenizer={tokenizer_name!r})")
        folder = data_dir / "tokens" / tokenizer_name
        names = [f"{split}.npy", f"{split}.offsets.npy", "tokenizer.json"]
        verify(data_dir, [f"tokens/{tokenizer_name}/{name}" for name in names])  # a zeroed file must not train
        self._set(_load_npy(folder / names[0], mmap=True), _load_npy(folder / names[1]),
                  manifest.tokenizers[tokenizer_name]["vocab_size"], folder / "tokenizer.json")

    @classmethod
    def from_arrays(cls, tokens: np.ndarray, offsets: np.ndarray, vocab_size: int) -> TokenStream:
        """A stream over in-memory arrays (same layout as the files)."""
        stream = cls.__new__(cls)
        stream._set(np.asarray(tokens), np.asarray(offsets, dtype=np.int64), vocab_size, None)
        return stream

    def _set(self, tokens: np.ndarray, offsets: np.ndarray, vocab_size: int, tokenizer_path: Path | None) -> None:
        if tokens.ndim != 1 or offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 \
                or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must rise from 0 to len(tokens) and tokens must be one-dimensional")
        self.tokens, self.offsets, self.vocab_size, self.tokenizer_path = tokens, offsets, vocab_size, tokenizer_path

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"corpus file {path} is not a valid .npy array ({exc}); rebuild with "
                         "prepare(force=True)") from None


def _check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _check_state(state: dict, expected: dict) -> None:
    wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if wrong:
        raise ValueError(f"loader state was saved with a different configuration (saved, current): {wrong}")


class RandomWindows:
    """Batches of ``(inputs, targets)``, each ``[batch_size, seq_len]`` int64, with targets = inputs shifted by one.

    Every epoch cuts the stream into non-overlapping windows of ``seq_len + 1`` tokens on a grid with a
    random shift, shuffles them, and deals them round-robin to the ``world_size`` ranks, so ranks read
    disjoint windows and every rank gets the same number of batches. Windows may cross document
    boundaries. The order depends only on ``(seed, epoch)``, so ``state_dict()`` is just the position.
    """

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        _check_shard(rank, world_size)
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        window = seq_len + 1
        # the worst shift leaves (len - window + 1) // window slots; every rank needs a full batch of them
        min_slots = (len(stream) - window + 1) // window
        self.batches_per_epoch = min_slots // world_size // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"a stream of {len(stream)} tokens is too short for batch_size={batch_size} windows of "
                             f"{window} tokens on each of {world_size} rank(s)")
        self.epoch, self.batch = 0, 0
        self._starts_epoch, self._starts = -1, np.empty(0, dtype=np.int64)

    def _epoch_starts(self) -> np.ndarray:
        """Start positions of this rank's windows in the current epoch, in reading order."""
        if self._starts_epoch != self.epoch:
            window = self.seq_len + 1
            rng = np.random.default_rng([self.seed, self.epoch])
            shift = int(rng.integers(window))
            slots = rng.permutation((len(self.stream) - shift) // window)
            mine = slots[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]
            self._starts, self._starts_epoch = shift + mine * window, self.epoch
        return self._starts

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._epoch_starts()[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
        rows = np.stack([self.stream.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        x = torch.from_numpy(rows)
        return x[:, :-1], x[:, 1:]

    def _config(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size, "stream_tokens": len(self.stream)}

    def state_dict(self) -> dict:
        """The position (epoch, batch) and the configuration it is valid for; identical on every rank."""
        return {"epoch": self.epoch, "batch": self.batch, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self._config())
        if not 0 <= state["batch"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"invalid loader position epoch={state['epoch']}, batch={state['batch']}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class Segments(NamedTuple):
    """One step of :class:`DocumentSegments`.

    ``inputs``/``targets``: ``[batch_size, seq_len]`` int64; positions past a document's end (and rows without a
    document) hold 0 and ``IGNORE_INDEX``. ``new_document``: True when every row starts a new document with this
    segment (start from a fresh state), False when every row continues the document of the previous step.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    new_document: bool


BUCKET_GROUPS = 16  # shuffled documents are sorted by length within runs of this many groups


class DocumentSegments:
    """``batch_size`` documents read side by side, each in consecutive segments, so that a recurrent/memory state
    can be carried from one batch to the next; the rows move on to new documents together.

    Segment ``k`` of a document holds inputs ``doc[k*L : (k+1)*L]`` and targets ``doc[k*L+1 : (k+1)*L+1]``
    (``L = seq_len``), so the targets of consecutive segments tile the document exactly. A group of ``batch_size``
    documents takes as many steps as its longest document needs; the rows of the shorter ones are padded meanwhile.
    With ``shuffle`` every epoch permutes the documents (seeded by ``(seed, epoch)``), sorts runs of
    :data:`BUCKET_GROUPS` groups by length (documents of a group have similar lengths, so little is padded), and
    shuffles the groups and the rows within each; without, groups are consecutive documents in order. Documents of
    fewer than 2 tokens (no target) are skipped; the last group of an epoch may have rows without a document. With
    ``loop=False`` iteration stops after one epoch.
    """

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 loop: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        self._lengths = np.diff(stream.offsets)
        self._documents = np.flatnonzero(self._lengths >= 2)
        if len(self._documents) == 0:
            raise ValueError("the stream has no document of at least 2 tokens")
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.epoch, self.group, self.segment = 0, 0, 0
        self._groups_epoch, self._groups = -1, []

    def _epoch_groups(self) -> list[np.ndarray]:
        """The groups of documents of the current epoch, in reading order."""
        if self._groups_epoch != self.epoch:
            documents, size = self._documents, self.batch_size
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                documents = rng.permutation(documents)
                run = BUCKET_GROUPS * size
                documents = np.concatenate([
                    part[np.argsort(-self._lengths[part], kind="stable")]
                    for part in (documents[i:i + run] for i in range(0, len(documents), run))])
            groups = [documents[i:i + size] for i in range(0, len(documents), size)]
            if self.shuffle:
                groups = [rng.permutation(groups[i]) for i in rng.permutation(len(groups))]
            self._groups, self._groups_epoch = groups, self.epoch
        return self._groups

    def _steps(self, group: np.ndarray) -> int:
        """Segments of the group's longest document."""
        return int(-(-(self._lengths[group].max() - 1) // self.seq_len))

    def __iter__(self) -> DocumentSegments:
        return self

    def __next__(self) -> Segments:
        if self.epoch > 0 and not self.loop:
            raise StopIteration
        groups = self._epoch_groups()
        group, length = groups[self.group], self.seq_len
        inputs = np.zeros((self.batch_size, length), dtype=np.int64)
        targets = np.full((self.batch_size, length), IGNORE_INDEX, dtype=np.int64)
        start = self.segment * length
        for row, document in enumerate(group):
            chunk = self.stream.document(int(document))[start:start + length + 1]
            n = len(chunk) - 1
            if n > 0:
                inputs[row, :n], targets[row, :n] = chunk[:-1], chunk[1:]
        new_document = self.segment == 0
        self.segment += 1
        if self.segment == self._steps(group):
            self.segment, self.group = 0, self.group + 1
            if self.group == len(groups):
                self.group, self.epoch = 0, self.epoch + 1
        return Segments(torch.from_numpy(inputs), torch.from_numpy(targets), new_document)

    def _config(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "loop": self.loop, "stream_tokens": len(self.stream)}

    def state_dict(self) -> dict:
        """The position (epoch, group, segment) and the configuration it is valid for."""
        return {"epoch": self.epoch, "group": self.group, "segment": self.segment, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self._config())
        self.epoch, self.group, self.segment = int(state["epoch"]), int(state["group"]), int(state["segment"])
        groups = self._epoch_groups()
        if self.epoch < 0 or not 0 <= self.group < len(groups) or not 0 <= self.segment < self._steps(
                groups[self.group]):
            raise ValueError(f"invalid loader position epoch={self.epoch}, group={self.group}, "
                             f"segment={self.segment}")
