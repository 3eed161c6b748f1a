"""Tiny random models of every architecture family subject.py maps, built in the tests.

One factory for all test modules, so a family's config is written once. Sizes, attention
implementation and any config field are parameters: the hook-site tests want eager attention
and a strong final soft-cap, the engine tests SDPA and sliding windows shorter than the context.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = ("gpt2", "neox_parallel", "neox_sequential", "gpt_neo", "llama", "mistral", "qwen2",
            "gemma2")
"""GPT-NeoX in both residual modes: parallel (Pythia's, HF's default) and sequential."""


def _alternating(n_layers: int, first: str, second: str) -> list[str]:
    return [first if i % 2 == 0 else second for i in range(n_layers)]


def make_model(
    family: str, *, vocab: int, d: int, n_layers: int, window: int = 4,
    attn: str | None = "eager", **overrides: Any,
) -> torch.nn.Module:
    """A randomly initialised causal LM of ``family`` (no dropout); ``overrides`` replace config
    fields; ``attn=None`` keeps transformers' default attention implementation. Local / sliding
    attention alternates with global attention, starting local for Gemma-2 and global for GPT-Neo
    (as those models do)."""
    impl: dict[str, Any] = {} if attn is None else {"attn_implementation": attn}
    llama: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **impl,
    )
    if family == "gpt2":
        cfg = dict(vocab_size=vocab, n_positions=64, n_embd=d, n_layer=n_layers, n_head=4,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                   eos_token_id=2, **impl)
        return GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides}))
    if family in ("neox_parallel", "neox_sequential"):
        cfg = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers,
                   num_attention_heads=4, intermediate_size=2 * d, max_position_embeddings=64,
                   rotary_pct=0.5, use_parallel_residual=family == "neox_parallel",
                   hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                   **impl)
        return GPTNeoXForCausalLM(GPTNeoXConfig(**{**cfg, **overrides}))
    if family == "gpt_neo":
        types = [[[t], 1] for t in _alternating(n_layers, "global", "local")]
        cfg = dict(vocab_size=vocab, max_position_embeddings=64, hidden_size=d,
                   num_layers=n_layers, attention_types=types, num_heads=4,
                   intermediate_size=2 * d, window_size=window, resid_dropout=0.0,
                   embed_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
                   **impl)
        return GPTNeoForCausalLM(GPTNeoConfig(**{**cfg, **overrides}))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**{**llama, **overrides}))
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**{**llama, "sliding_window": window,
                                                   **overrides}))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**{**llama, **overrides}))
    if family == "gemma2":
        cfg = dict(llama, head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
                   layer_types=_alternating(n_layers, "sliding_attention", "full_attention"),
                   attn_logit_softcapping=50.0, final_logit_softcapping=5.0)
        return Gemma2ForCausalLM(Gemma2Config(**{**cfg, **overrides}))
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def perturb(model: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter (norm gains, biases, Gemma's zero-initialised norms) so that
    no module is close to an identity and a wrong hook mapping cannot pass by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model
