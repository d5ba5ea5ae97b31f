"""Writes configs/lm/<size>/<variant>.yaml: every variant at each size, its model from `titans.model.preset` (so
that variants of one size are matched in parameter count by their SwiGLU width). Run it after changing a preset or
a section below: `python configs/lm/generate.py`; tests/test_cli.py checks that the files are current."""

from __future__ import annotations

from pathlib import Path

import yaml

from titans.model import VARIANTS, preset
from titans.typed_yaml import to_dict

HERE = Path(__file__).parent

_PAPER = {  # the paper's 170M / 340M runs (Section 5.1): 4K context, 0.5M tokens per step, 32K BPE
    "data": {"task": "text", "tokenizer": "bpe32k"},
    "optim": {"lr": 4e-4, "weight_decay": 0.1, "warmup_steps": 1000, "min_lr_ratio": 0.1, "grad_clip": 1.0,
              "grad_accum": 8},
    "train": {"steps": 30000, "batch_size": 16, "seq_len": 4096, "eval_every": 1000, "eval_batches": 16,
              "checkpoint_every": 1000, "keep_last": 3, "precision": "bf16", "activation_checkpointing": True,
              "tbptt_segments": 1, "log_every": 10},
    "eval": {"batch_size": 4, "samples": 50, "lengths": [2048, 4096, 8192, 16384],
             "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "chunk_len": 4096},
}


def _paper_header(size: str) -> str:
    return (f"# The paper's {size.upper()} shape (Section 5.1: 4K context, AdamW lr 4e-4 with cosine decay, weight "
            "decay 0.1,\n# 0.5M tokens per step) with a 32K BPE trained on the corpus; every variant matched to "
            f"{size.upper()} parameters.\n# Needs a GPU and `titans data prepare --tokenizer bpe32k`.\n")


_SMALL = {
    "data": {"task": "text", "tokenizer": "bytes"},
    "optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 200, "min_lr_ratio": 0.1, "grad_clip": 1.0,
              "grad_accum": 1},
    "train": {"steps": 5000, "batch_size": 16, "seq_len": 512, "eval_every": 500, "eval_batches": 8,
              "checkpoint_every": 500, "keep_last": 3, "precision": "fp32", "tbptt_segments": 1, "log_every": 10},
    "eval": {"batch_size": 8, "samples": 16, "lengths": [512, 1024, 2048, 4096],
             "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "chunk_len": 512},
}
_SMALL_HEADER = ("# Real-text language modelling at the small size (~1.5M parameters, every variant matched by its "
                 "SwiGLU\n# width), byte tokens. Needs the corpus: `titans data prepare`.\n")

# size -> (header, preset overrides, the run's other sections)
SIZES = {
    "small": (_SMALL_HEADER, {"tie_embeddings": True}, _SMALL),
    "170m": (_paper_header("170m"), {"vocab_size": 32768}, _PAPER),
    "340m": (_paper_header("340m"), {"vocab_size": 32768}, _PAPER),
}


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                             flow_style=True))


def render(size: str, variant: str) -> str:
    """The text of configs/lm/<size>/<variant>.yaml."""
    header, overrides, sections = SIZES[size]
    made_by = ", ".join([repr(size), repr(variant)] + [f"{k}={v!r}" for k, v in overrides.items()])
    run = {"name": f"lm-{size}-{variant}", "model": to_dict(preset(size, variant, **overrides)), **sections}
    return (f"{header}# Variant {variant}; generated from titans.model.preset({made_by}).\n"
            + yaml.dump(run, Dumper=_Dumper, sort_keys=False))


def main() -> None:
    for size in SIZES:
        for variant in VARIANTS:
            (HERE / size / f"{variant}.yaml").write_text(render(size, variant), encoding="utf-8")


if __name__ == "__main__":
    main()
