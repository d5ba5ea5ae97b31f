"""Datasets of the titans offline lm-eval tasks: JSON Lines files beside this one, read with the ``datasets``
library's local ``json`` loader (no hub). lm-eval resolves ``!function titans_tasks.<name>`` next to the YAML files,
so the folder works from any working directory and wherever it is copied (``python -m titans.harness.build_tasks``)."""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _load(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(HERE / f"{name}.jsonl")})


def cloze(**metadata) -> datasets.DatasetDict:
    return _load("cloze")


def ppl(**metadata) -> datasets.DatasetDict:
    return _load("ppl")
