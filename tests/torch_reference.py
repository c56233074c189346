"""torch and transformers for the reference tests, imported on first use.

Test modules that compare against torch import these names at the top and mark themselves (or
their tests) with ``pytest.mark.torch``; collecting them needs no torch, so the Python 3.12 leg,
which has none, deselects them with ``-m "not torch"`` and runs everything else.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _LazyModule(types.ModuleType):
    """A module that is imported the first time one of its attributes is read."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        return getattr(module, attr)


torch = _LazyModule("torch")
transformers = _LazyModule("transformers")


def llama_config(cfg: Any, **overrides: Any) -> Any:
    """The HF LlamaConfig of an agpt-jax GPTConfig: Megatron's Llama (padded vocabulary in the
    softmax, untied embeddings, no biases, full-head RoPE), eager attention."""
    fields = dict(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        attn_implementation="eager")
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)
