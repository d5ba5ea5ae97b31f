"""Hugging Face transformers integration (`pip install 'titans[hf]'`): `TitansHFConfig`, `TitansForCausalLM` and its
`TitansCache`, registered as model type "titans" with `AutoConfig` and `AutoModelForCausalLM`; conversion between
titans run directories and transformers directories (`titans export-hf`, `titans import-hf`)."""

from transformers import AutoConfig, AutoModelForCausalLM

from titans.hf.cache import TitansCache
from titans.hf.configuration import TitansHFConfig
from titans.hf.modeling import TitansForCausalLM

AutoConfig.register(TitansHFConfig.model_type, TitansHFConfig, exist_ok=True)
AutoModelForCausalLM.register(TitansHFConfig, TitansForCausalLM, exist_ok=True)

__all__ = ["TitansCache", "TitansForCausalLM", "TitansHFConfig"]
