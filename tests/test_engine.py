"""The batched engine equals a full re-forward with the same last-position edit, in every family.

Every model is a tiny random one (built here, perturbed so that no module is near identity), with
sliding / local attention windows shorter than the context so the window logic is exercised.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from families import make_model, perturb

from steerscope import engine as engine_mod
from steerscope.engine import CleanPrefix
from steerscope.errors import SteerscopeError
from steerscope.subject import Subject

VOCAB, D, N_LAYERS, SEQ, WINDOW = 61, 32, 3, 11, 4
ATOL = 1e-5
FAMILIES = ["gpt2", "neox", "gpt_neo", "llama", "llama_sdpa", "mistral", "qwen2_sliding", "gemma2"]

torch.set_num_threads(2)


# engine family name → (factory family, attention implementation, config overrides)
_SPECS: dict[str, tuple[str, str | None, dict]] = {
    "gpt2": ("gpt2", None, {}),  # None: transformers' default attention (SDPA where supported)
    "neox": ("neox_parallel", None, {}),
    "gpt_neo": ("gpt_neo", None, {}),
    "llama": ("llama", "eager", {}),
    "llama_sdpa": ("llama", "sdpa", {}),
    "mistral": ("mistral", "sdpa", {}),
    "qwen2_sliding": ("qwen2", "sdpa", dict(
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
    "gemma2": ("gemma2", "eager", {}),
}


@functools.cache
def _subject(family: str) -> Subject:
    torch.manual_seed(0)
    base, attn, overrides = _SPECS[family]
    model = make_model(base, vocab=VOCAB, d=D, n_layers=N_LAYERS, window=WINDOW, attn=attn,
                       **overrides)
    return Subject(perturb(model.float().eval()))


def _ids(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _full(
    subject: Subject, ids: torch.Tensor, site: str | None, vec: torch.Tensor | None,
    capture: tuple[str, ...] = (), fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference: a full forward of one context with ``vec`` added at its last position (or
    ``fn`` applied to the last position)."""
    edits = None
    if site is not None and (vec is not None or fn is not None):

        def edit(x: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            out[:, -1] = fn(x[:, -1]) if fn is not None else x[:, -1] + vec
            return out

        edits = {site: edit}
    logits, store, _ = subject.forward(ids, edits=edits, capture=capture)
    assert logits is not None
    return logits[:, -1], {s: v[:, -1] for s, v in store.items()}


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


# resid_pre 0: nothing to skip; resid_post 0: replay from block 1; mlp_out 1: from block 1 with
# the edit inside it; resid_post 2: the last block (no later block to hand the edit to).
SITES = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out",
         "blocks.2.hook_resid_post"]


@pytest.mark.parametrize("site", SITES)
def test_replay_equals_full_forward(family: str, site: str) -> None:
    """Every triple (context, delta) at every kind of site: logits and captures match."""
    subject = _subject(family)
    ids = _ids()
    capture = ("blocks.2.hook_resid_post", site)
    pre = CleanPrefix.build(subject, ids, capture=capture, batch_size=4)  # 2 prefix batches
    assert pre.fast, f"{family} fell back to the full forward"
    ctx = torch.tensor([0, 3, 3, 5, 1, 0, 2])
    delta = torch.randn(len(ctx), D, generator=torch.Generator().manual_seed(2))
    logits, acts = pre.replay(ctx, site, delta, capture=capture)
    for i, c in enumerate(ctx.tolist()):
        ref, ref_acts = _full(subject, ids[c:c + 1], site, delta[i], capture)
        torch.testing.assert_close(logits[i], ref[0], atol=ATOL, rtol=0)
        for s in capture:
            torch.testing.assert_close(acts[s][i], ref_acts[s][0], atol=ATOL, rtol=0)
        assert (logits[i] - pre.clean_logits[c]).abs().max() > 1e-3  # the edit does something


def test_clean_state_equals_full_forward(family: str) -> None:
    subject = _subject(family)
    ids = _ids(seed=3)
    site = "blocks.1.hook_resid_post"
    pre = CleanPrefix.build(subject, ids, capture=(site,))
    ref, ref_acts = _full(subject, ids, None, None, (site,))
    torch.testing.assert_close(pre.clean_logits, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(pre.clean_acts[site], ref_acts[site], atol=ATOL, rtol=0)
    # a clean replay (no site) reproduces the clean state
    again, _ = pre.replay(torch.arange(pre.n))
    torch.testing.assert_close(again, pre.clean_logits, atol=ATOL, rtol=0)


def test_sliding_window_actually_bites() -> None:
    """The windowed families differ from their full-attention twins on these contexts."""
    ids = _ids()
    mistral = _subject("mistral")
    pre = CleanPrefix.build(mistral, ids)
    cfg = mistral.model.config
    cfg.sliding_window = 64  # same weights, window longer than the context
    try:
        wide, _ = _full(mistral, ids, None, None)
    finally:
        cfg.sliding_window = WINDOW
    assert (wide - pre.clean_logits).abs().max() > 1e-3


def test_chunking_and_memory_budget_do_not_change_results() -> None:
    subject = _subject("llama_sdpa")
    ids = _ids(8)
    site = "blocks.0.hook_resid_post"
    ctx = torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(4))
    delta = torch.randn(40, D, generator=torch.Generator().manual_seed(5))
    big = CleanPrefix.build(subject, ids, capture=(site,))
    small = CleanPrefix.build(subject, ids, capture=(site,), memory_mb=0.05)
    assert small.chunk_size() < 40 <= big.chunk_size()
    a, _ = big.replay(ctx, site, delta)
    b, _ = small.replay(ctx, site, delta)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_fast_path_equals_forced_full_forward_path() -> None:
    subject = _subject("gemma2")
    ids = _ids()
    site = "blocks.1.hook_mlp_out"
    fast = CleanPrefix.build(subject, ids)
    slow = CleanPrefix.build(subject, ids, fast=False)
    assert fast.fast and not slow.fast
    ctx = torch.tensor([5, 4, 0])
    delta = torch.randn(3, D)
    torch.testing.assert_close(fast.replay(ctx, site, delta)[0], slow.replay(ctx, site, delta)[0],
                               atol=ATOL, rtol=0)


def test_edit_and_row_edit() -> None:
    """``edit`` sees the last position of every row; ``row_edit`` also gets each row's index."""
    subject = _subject("llama")
    ids = _ids()
    site = "blocks.1.hook_resid_pre"
    pre = CleanPrefix.build(subject, ids, capture=(site,))
    ctx = torch.tensor([1, 2, 2])
    scale = torch.tensor([0.0, 2.0, -1.0])
    got, acts = pre.replay(ctx, site, row_edit=lambda x, rows: x * scale[rows, None].to(x),
                           capture=(site,))
    got2, _ = pre.replay(ctx, site, edit=lambda x: x * 0.0)
    for i, c in enumerate(ctx.tolist()):
        clean_site = pre.clean_acts[site][c]
        torch.testing.assert_close(acts[site][i], clean_site * scale[i], atol=ATOL, rtol=0)
        ref, _ = _full(subject, ids[c:c + 1], site, None, fn=lambda x, k=scale[i]: x * k)
        torch.testing.assert_close(got[i], ref[0], atol=ATOL, rtol=0)
    ref0, _ = _full(subject, ids[1:2], site, None, fn=lambda x: x * 0.0)
    torch.testing.assert_close(got2[0], ref0[0], atol=ATOL, rtol=0)


def test_skipped_blocks_are_not_run_and_are_restored() -> None:
    """Steering at blocks.1.resid_post replays only block 2; the model is left as it was."""
    subject = _subject("llama_sdpa")
    ids = _ids()
    pre = CleanPrefix.build(subject, ids)
    pre.replay(torch.tensor([0]), "blocks.1.hook_resid_post", torch.zeros(1, D))  # warm-up
    ran: list[int] = []
    handles = [b.register_forward_hook(lambda *_a, i=i: ran.append(i))
               for i, b in enumerate(subject.layers)]
    try:
        pre.replay(torch.tensor([0, 1]), "blocks.1.hook_resid_post", torch.ones(2, D))
    finally:
        for h in handles:
            h.remove()
    assert ran == [2]
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in subject.layers)
    assert subject.model.config._attn_implementation == "sdpa"


def test_single_query_attention_matches_sdpa() -> None:
    """The replay's bmm attention equals torch SDPA, with and without a window mask."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 1, 8, generator=gen)
    k = torch.randn(5, 2, 9, 8, generator=gen)
    v = torch.randn(5, 2, 9, 8, generator=gen)
    mask = torch.ones(5, 1, 1, 9, dtype=torch.bool)
    mask[:, :, :, :3] = False
    for m in (None, mask):
        got, _ = engine_mod._single_query_attention_forward(None, q, k, v, m, scaling=0.3)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=m, scale=0.3
        ).transpose(1, 2)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [
    lambda s, ids: CleanPrefix.build(s, ids[:, :1]),
    lambda s, ids: CleanPrefix.build(s, ids[0]),
    lambda s, ids: CleanPrefix.build(s, ids, capture=("blocks.9.hook_resid_post",)),
    lambda s, ids: CleanPrefix.build(s, ids).replay(torch.tensor([6]), "blocks.0.hook_resid_pre",
                                                    torch.zeros(1, D)),
    lambda s, ids: CleanPrefix.build(s, ids).replay(torch.tensor([0]), "blocks.0.hook_resid_pre",
                                                    torch.zeros(2, D)),
    lambda s, ids: CleanPrefix.build(s, ids).replay(torch.tensor([0]), "blocks.0.hook_resid_pre",
                                                    torch.full((1, D), float("nan"))),
])
def test_bad_input_raises(bad) -> None:  # noqa: ANN001 - a lambda
    with pytest.raises(SteerscopeError):
        bad(_subject("llama"), _ids())
