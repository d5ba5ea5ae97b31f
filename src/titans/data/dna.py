"""Real DNA for genomics (paper Section 5.6, Table 4): next-token modelling and coding / non-coding classification on
the chloroplast genome of Arabidopsis thaliana (NC_000932.1, vendored from Biopython's test data, see
``dna/NOTICE.md``), tokenised by non-overlapping k-mers (k = 1: one token per base).

The genome is circular with an inverted repeat: IRa (the last 26,264 bases) is the reverse complement of IRb, base for
base. It is dropped, so that no sequence occurs in two splits; what remains (LSC, IRb, SSC: 128,214 bases) is split by
position into train / validation / test (0.8 / 0.1 / 0.1), and every window lies inside one split. ``dna`` scores
every next k-mer of a window; ``dna_coding`` reads a window whose bases all lie in coding sequence (an annotated CDS)
or all outside it, then a query token, and scores one target there: the class token (the LM head's rows of the two
class tokens are the classification head), classes drawn 50 / 50.
"""

from __future__ import annotations

import functools
import gzip
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from titans.data.synthetic import SyntheticTask, _from_stream

__all__ = ["DNA_SPLITS", "DNA_TASKS", "DNATask", "CodingTask", "Genome", "encode", "load_genome"]

GENOME_FILE = "NC_000932.gb.gz"
INVERTED_REPEAT_A = (128_214, 154_478)  # 0-based [start, end): the reverse complement of IRb [84_170, 110_434)
INVERTED_REPEAT_B = (84_170, 110_434)
DNA_SPLITS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
BASES = "ACGT"


@dataclass(frozen=True)
class Genome:
    """The sequence (upper-case ACGT) and, per base, whether it lies in an annotated coding sequence."""

    sequence: str
    coding: np.ndarray


def _ranges(location: str) -> list[tuple[int, int]]:
    """0-based [start, end) ranges of a GenBank location (complement / join / order, partial ends < >)."""
    return [(int(a) - 1, int(b)) for a, b in re.findall(r"<?(\d+)\.\.>?(\d+)", location)]


@functools.cache
def load_genome() -> Genome:
    """The vendored genome without its inverted repeat IRa, with the coding mask of its CDS features."""
    text = gzip.decompress((resources.files("titans.data") / "dna" / GENOME_FILE).read_bytes()).decode("ascii")
    features, origin = text.split("\nORIGIN", 1)
    sequence = re.sub(r"[^a-z]", "", origin.split("//")[0]).upper()
    coding = np.zeros(len(sequence), dtype=bool)
    for location in re.findall(r"^ {5}CDS {13}(.+?)(?=\n {21}/|\n {5}\S)", features, re.M | re.S):
        for start, end in _ranges(location.replace("\n", "").replace(" ", "")):
            coding[start:end] = True
    (a, b), (ia, ib) = INVERTED_REPEAT_A, INVERTED_REPEAT_B
    complement = str.maketrans(BASES, "TGCA")
    if sequence[a:b].translate(complement)[::-1] != sequence[ia:ib]:
        raise ValueError(f"{GENOME_FILE}: the inverted repeat is not where it should be")
    return Genome(sequence[:a] + sequence[b:], np.concatenate([coding[:a], coding[b:]]))


def encode(sequence: str, k: int) -> np.ndarray:
    """Non-overlapping k-mers as ids in [0, 4^k) (A, C, G, T the digits of a base-4 number), a trailing partial
    k-mer dropped; a k-mer holding any other letter is 4^k."""
    digits = np.frombuffer(sequence[:len(sequence) // k * k].encode("ascii"), dtype=np.uint8)
    lookup = np.full(256, 4, dtype=np.int64)
    lookup[np.frombuffer(BASES.encode(), dtype=np.uint8)] = np.arange(4)
    values = lookup[digits].reshape(-1, k)
    ids = (values * 4 ** np.arange(k - 1, -1, -1)).sum(1)
    return np.where((values == 4).any(1), 4 ** k, ids)


def _split_bounds(length: int, split: str) -> tuple[int, int]:
    if split not in DNA_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(DNA_SPLITS)}")
    lo, hi = DNA_SPLITS[split]
    return int(length * lo), int(length * hi)


@dataclass(frozen=True)
class DNATask(SyntheticTask):
    """Next-k-mer modelling: windows of ``seq_len + 1`` k-mers of the split, every next k-mer scored. Ids: the k-mers
    0 .. 4^k - 1, 4^k for a k-mer with another letter."""

    seq_len: int = 256
    k: int = 1
    split: str = "train"
    vocab_size: int = 0  # set from k

    def __post_init__(self) -> None:
        if self.k < 1 or self.seq_len < 1:
            raise ValueError(f"dna: k and seq_len must be >= 1, got k={self.k}, seq_len={self.seq_len}")
        object.__setattr__(self, "vocab_size", 4 ** self.k + 1)
        start, end = _split_bounds(len(load_genome().sequence), self.split)
        tokens = encode(load_genome().sequence[start:end], self.k)
        if len(tokens) < self.seq_len + 1:
            raise ValueError(f"dna: the {self.split} split holds {len(tokens)} {self.k}-mers, fewer than seq_len + 1 "
                             f"= {self.seq_len + 1}")
        object.__setattr__(self, "tokens", tokens)

    def generate(self, rng: np.random.Generator):
        start = int(rng.integers(0, len(self.tokens) - self.seq_len))
        stream = self.tokens[start:start + self.seq_len + 1]
        return _from_stream(stream, np.ones(self.seq_len, dtype=bool))


@dataclass(frozen=True)
class CodingTask(SyntheticTask):
    """Coding / non-coding classification: ``seq_len - 1`` k-mers whose bases all lie in a CDS (class 1) or all
    outside (class 0), then the query token 4^k + 1; the target at the query is the class token 4^k + 2 + class, the
    only scored position."""

    seq_len: int = 65
    k: int = 1
    split: str = "train"
    vocab_size: int = 0  # set from k

    def __post_init__(self) -> None:
        if self.k < 1 or self.seq_len < 2:
            raise ValueError(f"dna_coding: need k >= 1 and seq_len >= 2, got k={self.k}, seq_len={self.seq_len}")
        object.__setattr__(self, "vocab_size", 4 ** self.k + 4)
        genome = load_genome()
        start, end = _split_bounds(len(genome.sequence), self.split)
        bases = (self.seq_len - 1) * self.k
        coding = np.concatenate([[0], np.cumsum(genome.coding[start:end])])
        in_cds = coding[bases:] - coding[:-bases]  # coding bases of the window starting at each position
        starts = [np.flatnonzero(in_cds == 0), np.flatnonzero(in_cds == bases)]
        if min(len(s) for s in starts) == 0:
            raise ValueError(f"dna_coding: the {self.split} split has no window of {bases} bases of each class; "
                             "shorten train.seq_len")
        object.__setattr__(self, "sequence", genome.sequence[start:end])
        object.__setattr__(self, "starts", starts)

    @property
    def query(self) -> int:
        return 4 ** self.k + 1

    def label_token(self, label: int) -> int:
        return 4 ** self.k + 2 + label

    def generate(self, rng: np.random.Generator):
        label = int(rng.integers(0, 2))
        start = int(self.starts[label][rng.integers(0, len(self.starts[label]))])
        window = encode(self.sequence[start:start + (self.seq_len - 1) * self.k], self.k)
        stream = np.concatenate([window, [self.query, self.label_token(label)]])
        scored = np.zeros(self.seq_len, dtype=bool)
        scored[-1] = True
        return _from_stream(stream, scored)


DNA_TASKS = {"dna": DNATask, "dna_coding": CodingTask}
