"""Prompted examples of a fixed length for mixing into language-model training (``data.mix_tasks``): RULER's
single-needle tasks (:mod:`titans.data.niah`) and BABILong's qa1-qa5 (:mod:`titans.data.babilong`), as teacher-forced
rows whose prompt is read and whose answer alone is scored, padded to the training length.

Training examples never meet the evaluation ones: S-NIAH draws its keys, values and depths from
:data:`TRAIN_SEED` (evaluation: seed 42), BABILong its bAbI samples from :data:`TRAIN_SEED` and its background from the
corpus's train books (evaluation: the validation or test books).
"""

from __future__ import annotations

from pathlib import Path

import torch

from titans.data.loader import IGNORE_INDEX

__all__ = ["MIX_TASKS", "TRAIN_SEED", "PromptedExamples"]

MIX_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "qa1", "qa2", "qa3", "qa4", "qa5")
TRAIN_SEED = 7_000_000  # far from evaluation's seeds (42 for S-NIAH, 0.. for bAbI samples)


class PromptedExamples:
    """Example ``index`` of ``tasks`` (in turn: task ``index % len(tasks)``) as ``inputs``, ``targets``,
    ``loss_mask`` of exactly ``seq_len`` tokens, deterministic in ``(tasks, seq_len, seed, index)``."""

    def __init__(self, tasks: list[str] | tuple[str, ...], tokenizer, seq_len: int, *, seed: int = TRAIN_SEED,
                 data_dir: Path | None = None):
        from titans.data.babilong import BabilongGenerator
        from titans.data.niah import NIAH_TASKS, NIAHGenerator

        unknown = [t for t in tasks if t not in MIX_TASKS]
        if not tasks or unknown:
            raise ValueError(f"tasks must be a non-empty list of {list(MIX_TASKS)}, got {list(tasks)}")
        self.tasks, self.seq_len, self.seed = tuple(tasks), seq_len, seed
        # answer_budget 0: the prompt fills the row up to the answer (evaluation keeps RULER's 128 free for generation)
        self.generators = {task: NIAHGenerator(task, tokenizer, answer_budget=0) if task in NIAH_TASKS else
                           BabilongGenerator.from_corpus(task, tokenizer, "train", data_dir) for task in set(tasks)}
        for task in self.tasks:  # a length too short for a task fails now, not mid-training
            self[self.tasks.index(task)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        task = self.tasks[index % len(self.tasks)]
        example = self._sample(task, index).as_example()
        pad = self.seq_len - len(example["inputs"])
        return {"inputs": torch.nn.functional.pad(example["inputs"], (0, pad)),
                "targets": torch.nn.functional.pad(example["targets"], (0, pad), value=IGNORE_INDEX),
                "loss_mask": torch.nn.functional.pad(example["loss_mask"], (0, pad))}

    def _sample(self, task: str, index: int):
        """A sample of ``seq_len + 1`` tokens at most (inputs and targets are its ids shifted by one)."""
        generator, length = self.generators[task], self.seq_len + 1
        if task.startswith("niah"):
            return generator.sample(length, seed=self.seed, index=index)  # raises when the prompt cannot fit
        # BABILong: the context takes what the question and answer leave. BABILong allows context_length // 8
        # facts, more than fit at a short length in bytes, so a sample that overflows is drawn again with half as
        # many facts allowed, down to the two every task needs (short stories are over-represented at short lengths)
        context = length - 64
        if context < 16:
            raise ValueError(f"train.seq_len {self.seq_len} is too short for BABILong task {task}: need >= 79")
        max_facts = context // 8
        while True:
            sample = generator.sample(context, seed=self.seed, index=index, max_facts=max_facts)
            if len(sample.token_ids) <= length:
                return sample
            if max_facts == 2:
                raise ValueError(f"train.seq_len {self.seq_len} is too short for BABILong task {task}: with two "
                                 f"facts a sample still takes {len(sample.token_ids)} tokens")
            max_facts = max(2, max_facts // 2)
