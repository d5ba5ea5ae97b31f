"""`TitansForCausalLM`: a `TitansLM` as a transformers causal LM (save_pretrained / from_pretrained, generate())."""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from titans.checkpoint import upgrade_model_state
from titans.hf.cache import TitansCache
from titans.hf.configuration import TitansHFConfig
from titans.model import TitansLM

PADDING_REFUSED = ("attention_mask holds padding (zeros): a Titans model's recurrent memory state would read it (left "
                   "or right padding alike); give sequences of equal length, without padding")


class TitansForCausalLM(PreTrainedModel, GenerationMixin):
    """`self.model` is the `TitansLM`; generate() carries its streaming state in a `TitansCache` (greedy or sampled
    decoding, batches without padding)."""

    config_class = TitansHFConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}  # tied when config.tie_embeddings
    _is_stateful = True  # the cache cannot go back a token: transformers refuses assisted decoding
    _supported_generation_modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)

    def __init__(self, config: TitansHFConfig):
        super().__init__(config)
        self.model = TitansLM(config.to_titans())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: `TitansLM` initialises its own weights (embedding scale, memory gates) when built."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, refusing a checkpoint that lacks weights or has weights of other shapes
        (transformers would initialise them, and only `TitansLM` knows how). Weights an older release did not have
        get the values it computed with (`upgrade_model_state`: MAL's series gate, g = 1)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        lacking = sorted(info["missing_keys"] | {key for key, *_ in info["mismatched_keys"]})
        if lacking and not info["mismatched_keys"]:
            prefix = cls.base_model_prefix + "."
            state = {k: v for k, v in model.model.state_dict().items() if prefix + k not in lacking}
            filled = upgrade_model_state(model.model, state)
            with torch.no_grad():
                model.model.load_state_dict({k: state[k] for k in filled}, strict=False)
            lacking = [k for k in lacking if k.removeprefix(prefix) not in filled]
        if lacking:
            raise ValueError(f"the checkpoint lacks weights of this model or holds them in other shapes "
                             f"({len(lacking)}: {', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''})")
        return (model, info) if want_info else model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is a TitansCache, made by the first forward pass

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.head

    @can_return_tuple
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: TitansCache | None = None, labels: torch.Tensor | None = None,
                use_cache: bool = True) -> CausalLMOutputWithPast:
        """Logits of `input_ids` (B, T) after the tokens `cache` has read (none without one); the cache, given or new
        with use_cache, then holds the state after them. With `labels`: the next-token loss (-100 ignored)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(PADDING_REFUSED)
        read = self.model.step if input_ids.shape[1] == 1 else self.model  # a decoding step: the single-token path
        logits, state = read(input_ids, None if cache is None else cache.state)
        if cache is None and use_cache:
            cache = TitansCache()
        if cache is not None:
            cache.state = state
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache: TitansCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      **kwargs) -> dict:
        """generate() passes the whole sequence so far: the model reads the tokens its cache has not read."""
        seen = 0 if cache is None else cache.get_seq_length()
        if seen >= input_ids.shape[1]:
            raise ValueError(f"the cache has read {seen} tokens, input_ids hold {input_ids.shape[1]}: give the whole "
                             "sequence, the tokens the cache read followed by new ones")
        return {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask, "cache": cache,
                "use_cache": use_cache}
