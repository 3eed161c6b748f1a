"""Shared fixtures: tiny random models per architecture family and tiny random SAEs.

Tests build their models here rather than downloading them, so the suite runs offline and fast;
the real TinyStories-656K model is used only by end-to-end tests (``real_subject``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from steerscope.saes import SAE  # noqa: E402
from steerscope.subject import Subject  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama(d_model: int = 32, n_layers: int = 2, vocab: int = 64, seed: int = 0) -> Subject:
    """A random Llama-family model, small enough to run in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return Subject(LlamaForCausalLM(cfg).eval(), None, name="tiny-llama")


def tiny_sae(
    d_in: int, d_sae: int, arch: str = "standard", hook: str = "blocks.0.hook_resid_post",
    seed: int = 0, k: int = 4,
) -> SAE:
    """A random SAELens SAE whose latents actually fire on random-model activations."""
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    torch.manual_seed(seed)
    if arch == "standard":
        module = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    elif arch == "jumprelu":
        module = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    elif arch == "topk":
        module = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        module.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        module.W_dec.copy_(torch.randn(d_sae, d_in) / d_in**0.5)
        module.b_enc.copy_(0.1 * torch.randn(d_sae))
        module.b_dec.zero_()
        if arch == "jumprelu":
            module.threshold.fill_(0.05)
    module.cfg.metadata.hook_name = hook
    return SAE(module=module.eval(), name=f"tiny-{arch}", hook=hook)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def real_subject(shared_data: Path) -> Subject:
    return Subject.load(shared_data / "tinystories-656k")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module, restored afterwards: tiny models gain nothing from
    threads, and on a shared CPU OpenMP's spin-waiting makes each tiny op far slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
