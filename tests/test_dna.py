"""Real DNA (paper Section 5.6): the vendored genome without its inverted repeat, k-mer tokens, splits by position
that share no sequence, pure coding / non-coding windows, and a tiny run through `titans train` / `titans eval`."""

from __future__ import annotations

import numpy as np
import pytest

from titans.batches import make_batches, make_task_from_config
from titans.cli import main
from titans.config import RunConfig
from titans.data.dna import CodingTask, DNATask, encode, load_genome
from titans.data.synthetic import example_rng
from titans.fileio import save_yaml
from titans.typed_yaml import ConfigError, from_dict

TINY = {"name": "tiny-dna", "model": dict(variant="lmm", vocab_size=8, dim=16, layers=1, heads=2, chunk_size=4),
        "data": {"task": "dna"}, "optim": {"warmup_steps": 1},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 2, "eval_batches": 1, "log_every": 1,
                  "device": "cpu"},
        "eval": {"batch_size": 2, "samples": 2, "lengths": [16], "chunk_len": 16}}


def test_the_genome_is_real_and_its_inverted_repeat_is_gone():
    genome = load_genome()
    assert len(genome.sequence) == 154_478 - 26_264 and set(genome.sequence) == set("ACGT")
    assert 0.4 < genome.coding.mean() < 0.6  # the CDS of a chloroplast genome cover about half of it
    assert genome.sequence.startswith("ATGGGCGAACGACGGGAATTGAACCCGCGATGGTGAATTCACAATCC")  # NC_000932.1, ORIGIN


def test_kmers_against_hand_computed_ids():
    assert encode("ACGTN", 1).tolist() == [0, 1, 2, 3, 4]
    assert encode("ACGTNAC", 2).tolist() == [1, 11, 16]  # AC = 0*4+1, GT = 2*4+3, NA holds N; the last C dropped
    assert encode("TTT", 3).tolist() == [63]


def test_splits_are_disjoint_parts_of_the_genome():
    sequence, tokens = load_genome().sequence, {}
    for split in ("train", "validation", "test"):
        tokens[split] = DNATask(seq_len=16, split=split).tokens
    assert np.array_equal(np.concatenate(list(tokens.values())), encode(sequence, 1))
    assert [len(t) for t in tokens.values()] == [102_571, 12_821, 12_822]
    example = DNATask(seq_len=16, split="test").generate(example_rng(0, 0))
    assert example["loss_mask"].all() and (example["inputs"][1:] == example["targets"][:-1]).all()


def test_coding_windows_are_pure_and_labelled_at_the_query():
    task = CodingTask(seq_len=33, k=2, split="validation")
    start = int(len(load_genome().sequence) * 0.8)
    coding = load_genome().coding[start:]
    labels = []
    for i in range(40):
        example = task.generate(example_rng(1, i))
        assert example["loss_mask"].tolist() == [False] * 32 + [True] and example["inputs"][-1] == task.query
        label = int(example["targets"][-1]) - task.label_token(0)
        labels.append(label)
        window = task.sequence.find("".join(_decode(example["inputs"][:-1].numpy(), 2)))
        assert window >= 0 and set(coding[window:window + 64]) == {bool(label)}
    assert 0 < sum(labels) < 40  # both classes


def _decode(ids, k):
    return ["".join("ACGT"[i // 4 ** (k - 1 - j) % 4] for j in range(k)) for i in ids]


def test_training_reads_train_evaluation_validation_and_eval_test(tmp_path, capsys):
    config = from_dict(RunConfig, TINY)
    assert make_batches(config, "eval").dataset.task.split == "validation"
    assert make_batches(config, "train").dataset.task.split == "train"
    path = tmp_path / "dna.yaml"
    save_yaml(config, path)
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert "dna task" in capsys.readouterr().out


def test_bad_dna_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="vocab_size"):
        make_task_from_config(from_dict(RunConfig, {**TINY, "data": {"task": "dna", "kwargs": {"k": 2}}}))
    with pytest.raises(ConfigError, match="data.kwargs.split"):
        make_task_from_config(from_dict(RunConfig, {**TINY, "data": {"task": "dna", "kwargs": {"split": "test"}}}))
    with pytest.raises(ConfigError, match="data.kwargs: dna_coding"):
        make_task_from_config(from_dict(RunConfig, {**TINY, "data": {"task": "dna_coding", "kwargs": {"kk": 1}}}))
