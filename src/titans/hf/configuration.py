"""`TitansHFConfig`: a `TitansConfig` as a transformers config, whose keys are exactly `TitansConfig`'s fields."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from titans.model import TitansConfig

FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TitansConfig))


class TitansHFConfig(PretrainedConfig):
    """The fields of `TitansConfig` (same names, defaults and validation), plus transformers' own bookkeeping."""

    model_type = "titans"
    # transformers' standard names, read through to the Titans fields (not stored twice)
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "layers", "num_attention_heads": "heads",
                     "tie_word_embeddings": "tie_embeddings"}

    def __init__(self, **kwargs):
        titans = TitansConfig(**{name: kwargs.pop(name) for name in FIELDS if name in kwargs})  # validates them
        for name in FIELDS:
            setattr(self, name, getattr(titans, name))
        super().__init__(**kwargs)

    __eq__ = PretrainedConfig.__eq__  # every attribute (transformers' dataclass one would compare only its own fields)

    @classmethod
    def from_titans(cls, config: TitansConfig, **kwargs) -> TitansHFConfig:
        return cls(**dataclasses.asdict(config), **kwargs)

    def to_titans(self) -> TitansConfig:
        return TitansConfig(**{name: getattr(self, name) for name in FIELDS})
