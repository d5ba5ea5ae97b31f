"""Loaders over the memory-mapped token streams written by :func:`titans.data.corpus.prepare`.

* :class:`RandomWindows`: shuffled contiguous windows of ``seq_len + 1`` tokens for ordinary LM training.
* :class:`DocumentSegments`: ``batch_size`` parallel streams, each walking through whole documents one
  segment at a time, so that a recurrent/memory state can be carried from one batch to the next (the
  Titans long-term memory, Section 3, is updated at test time segment by segment).

Both are deterministic per seed, resumable exactly from a small ``state_dict()`` and shardable by
``(rank, world_size)`` so that DDP ranks read disjoint data.
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

    ``inputs``/``targets``: ``[batch_size, seq_len]`` int64; positions past a document's end hold 0 and
    ``IGNORE_INDEX``. ``new_document``: ``[batch_size]`` bool, True where the stream started a new document
    with this segment (reset that stream's memory state before using it).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    new_document: torch.Tensor


class DocumentSegments:
    """``batch_size`` parallel streams, each reading whole documents in consecutive segments.

    Segment ``k`` of a document holds inputs ``doc[k*L : (k+1)*L]`` and targets ``doc[k*L+1 : (k+1)*L+1]``
    (``L = seq_len``), so the targets of consecutive segments tile the document exactly. When a stream
    finishes a document it takes the next one from a shared queue: this rank's documents (every
    ``world_size``-th, from ``rank``) in a per-epoch shuffled order (``shuffle``). With ``loop=False``
    the queue holds one pass over the documents and iteration stops once every stream is done.
    """

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, loop: bool = True):
        _check_shard(rank, world_size)
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        lengths = np.diff(stream.offsets)
        self._documents = np.array([d for d in range(rank, stream.num_documents, world_size) if lengths[d] >= 2])
        if len(self._documents) == 0:
            raise ValueError(f"rank {rank} of {world_size} has no document of at least 2 tokens")
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle, self.loop = seed, rank, world_size, shuffle, loop
        self._pulled = 0  # documents taken from the queue so far
        self._streams: list[list[int] | None] = [None] * batch_size  # [document, next position] per stream
        self._order_epoch, self._order = -1, self._documents

    def _next_document(self) -> int | None:
        epoch, index = divmod(self._pulled, len(self._documents))
        if epoch > 0 and not self.loop:
            return None
        if self.shuffle and self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, self.rank, epoch]).permutation(self._documents)
            self._order_epoch = epoch
        self._pulled += 1
        return int(self._order[index])

    def __iter__(self) -> DocumentSegments:
        return self

    def __next__(self) -> Segments:
        length = self.seq_len
        inputs = np.zeros((self.batch_size, length), dtype=np.int64)
        targets = np.full((self.batch_size, length), IGNORE_INDEX, dtype=np.int64)
        new_document = np.zeros(self.batch_size, dtype=bool)
        for b in range(self.batch_size):
            state = self._streams[b]
            if state is None or state[1] >= len(self.stream.document(state[0])) - 1:  # no targets left
                document = self._next_document()
                state = None if document is None else [document, 0]
                new_document[b] = document is not None
                self._streams[b] = state
            if state is None:
                continue
            document, position = state
            chunk = self.stream.document(document)[position:position + length + 1]
            n = len(chunk) - 1
            inputs[b, :n], targets[b, :n] = chunk[:-1], chunk[1:]
            state[1] = position + length
        if all(s is None for s in self._streams):
            raise StopIteration
        return Segments(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(new_document))

    def _config(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size, "rank": self.rank,
                "world_size": self.world_size, "shuffle": self.shuffle, "loop": self.loop,
                "stream_tokens": len(self.stream)}

    def state_dict(self) -> dict:
        """Queue position and each stream's (document, position); specific to this rank."""
        return {"pulled": self._pulled, "streams": [None if s is None else list(s) for s in self._streams],
                **self._config()}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self._config())
        if len(state["streams"]) != self.batch_size:
            raise ValueError(f"state has {len(state['streams'])} streams, expected {self.batch_size}")
        self._pulled = int(state["pulled"])
        self._streams = [None if s is None else [int(s[0]), int(s[1])] for s in state["streams"]]
