"""Subject maps TransformerLens hook names onto HF modules: check every family against HF itself.

Each family gets a tiny random model built from its config. References are computed without any
Subject machinery: the plain HF forward (``output_hidden_states=True``), our own forward hooks on
the raw HF modules, and by-hand recomputation of embeddings, MLP branches and residual sums.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from families import make_model, perturb

from steerscope.errors import SteerscopeError
from steerscope.subject import Subject

VOCAB = 97
D = 48
N_LAYERS = 3
BATCH = 2
SEQ = 10
WINDOW = 4  # sliding / local attention window, shorter than SEQ so it actually bites
KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
ALL_SITES = [f"blocks.{layer}.{kind}" for layer in range(N_LAYERS) for kind in KINDS]

FAMILIES = [
    "gpt2",
    "neox_parallel",
    "neox_sequential",
    "gpt_neo",
    "llama",
    "mistral",
    "qwen2",
    "gemma2",
]


# ---------------------------------------------------------------------------------- models
@functools.cache
def _build(family: str) -> Subject:
    torch.manual_seed(0)
    overrides = {"final_logit_softcapping": 1.0} if family == "gemma2" else {}  # far from linear
    model = make_model(family, vocab=VOCAB, d=D, n_layers=N_LAYERS, window=WINDOW, **overrides)
    return Subject(perturb(model.float().eval()))


def _ids(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def _vec(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(D, generator=gen) * scale


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def subj(family: str) -> Subject:
    return _build(family)


# ------------------------------------------------------------- independent references
# Everything below reads the raw HF modules directly; none of it goes through Subject.
def _layers(family: str, model: torch.nn.Module) -> torch.nn.ModuleList:
    if family in ("gpt2", "gpt_neo"):
        return model.transformer.h
    if family.startswith("neox"):
        return model.gpt_neox.layers
    return model.model.layers


def _raw_attn(family: str, block: torch.nn.Module) -> torch.nn.Module:
    if family in ("gpt2", "gpt_neo"):
        return block.attn
    if family.startswith("neox"):
        return block.attention
    return block.self_attn


def _embed(family: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream entering block 0, by hand from the embedding matrices."""
    pos = torch.arange(ids.shape[1])
    if family in ("gpt2", "gpt_neo"):
        return model.transformer.wte.weight[ids] + model.transformer.wpe.weight[pos]
    if family.startswith("neox"):
        return model.gpt_neox.embed_in.weight[ids]
    emb = model.model.embed_tokens.weight[ids]
    if family == "gemma2":
        emb = emb * math.sqrt(D)
    return emb


def _mlp_by_hand(
    family: str, block: torch.nn.Module, pre: torch.Tensor, attn: torch.Tensor
) -> torch.Tensor:
    """The MLP branch output of one block, recomputed from resid_pre and attn_out."""
    if family in ("gpt2", "gpt_neo"):
        return block.mlp(block.ln_2(attn + pre))
    if family == "neox_parallel":
        return block.mlp(block.post_attention_layernorm(pre))
    if family == "neox_sequential":
        return block.mlp(block.post_attention_layernorm(attn + pre))
    if family == "gemma2":
        return block.post_feedforward_layernorm(
            block.mlp(block.pre_feedforward_layernorm(pre + attn))
        )
    return block.mlp(block.post_attention_layernorm(pre + attn))


def _block_sum(family: str, pre: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor):
    """resid_post as the architecture adds it up (same association, so exact in float32)."""
    if family == "neox_parallel":
        return mlp + attn + pre
    return (pre + attn) + mlp


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _reference(family: str, model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Plain HF forward with our own hooks on the raw modules; every site's expected tensor."""
    layers = _layers(family, model)
    raw: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def keep(key: tuple[str, int]) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, _a: Any, out: Any) -> None:
            raw[key] = _first(out).detach().clone()

        return hook

    for i, block in enumerate(layers):
        handles.append(_raw_attn(family, block).register_forward_hook(keep(("attn", i))))
        handles.append(block.mlp.register_forward_hook(keep(("mlp", i))))
        handles.append(block.register_forward_hook(keep(("block", i))))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    assert len(hs) == N_LAYERS + 1
    exp: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, block in enumerate(layers):
            pre = _embed(family, model, ids) if i == 0 else hs[i]
            post = hs[i + 1] if i + 1 < N_LAYERS else raw[("block", i)]  # hs[-1] is final-normed
            attn = raw[("attn", i)]
            if family == "gemma2":
                attn = block.post_attention_layernorm(attn)
            exp[f"blocks.{i}.hook_resid_pre"] = pre
            exp[f"blocks.{i}.hook_attn_out"] = attn
            exp[f"blocks.{i}.hook_mlp_out"] = _mlp_by_hand(family, block, pre, attn)
            exp[f"blocks.{i}.hook_resid_post"] = post
    return {"logits": out.logits, "hidden_states": hs, "raw": raw, "sites": exp}


def _plain_logits(subj: Subject, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the untouched HF model (no cache, like Subject's default forward)."""
    with torch.no_grad():
        return subj.model(input_ids=ids, use_cache=False).logits


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _differs(a: torch.Tensor, b: torch.Tensor, by: float = 1e-4) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() > by


def _no_hooks_left(model: torch.nn.Module) -> bool:
    """No Subject hook is still installed (HF keeps its own output-capturing hooks)."""
    return not any(
        getattr(fn, "__module__", None) == "steerscope.subject"
        for m in model.modules()
        for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    )


# ------------------------------------------------------------------------- the tests
def test_family_detected(family: str, subj: Subject) -> None:
    assert subj.n_layers == N_LAYERS and subj.d_model == D and subj.vocab_size == VOCAB
    if family.startswith("neox"):
        assert subj.model.config.use_parallel_residual == (family == "neox_parallel")
    if family == "gpt_neo":
        assert subj.model.config.attention_layers == ["global", "local", "global"]


def test_residual_stream_matches_hidden_states(family: str, subj: Subject) -> None:
    ids = _ids()
    ref = _reference(family, subj.model, ids)
    hs = ref["hidden_states"]
    got = subj.capture(ids, ALL_SITES)
    assert set(got) == set(ALL_SITES)
    # block 0 input == embeddings (HF's own hidden_states[0] and our by-hand embedding)
    _close(got["blocks.0.hook_resid_pre"], hs[0])
    _close(got["blocks.0.hook_resid_pre"], _embed(family, subj.model, ids))
    for i in range(N_LAYERS):
        post = got[f"blocks.{i}.hook_resid_post"]
        assert post.shape == (BATCH, SEQ, D)
        if i + 1 < N_LAYERS:
            _close(post, hs[i + 1])
            torch.testing.assert_close(post, got[f"blocks.{i + 1}.hook_resid_pre"], atol=0, rtol=0)
            _close(got[f"blocks.{i + 1}.hook_resid_pre"], hs[i + 1])
        else:
            _close(post, ref["raw"][("block", i)])
            # HF's last hidden state is the final-normed one
            with torch.no_grad():
                _close(subj.final_norm(post), hs[-1])
    # the stream really moves between blocks (the checks above could not pass trivially)
    assert _differs(got["blocks.0.hook_resid_pre"], got["blocks.0.hook_resid_post"])


def test_gemma2_embedding_scale_is_in_resid_pre() -> None:
    subj = _build("gemma2")
    ids = _ids()
    pre = subj.capture(ids, ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"]
    unscaled = subj.model.model.embed_tokens.weight[ids]
    _close(pre, unscaled * math.sqrt(D))
    assert _differs(pre, unscaled, by=0.1)


def test_attn_and_mlp_out_match_architecture(family: str, subj: Subject) -> None:
    ids = _ids(1)
    ref = _reference(family, subj.model, ids)
    got = subj.capture(ids, ALL_SITES)
    for i in range(N_LAYERS):
        for kind in ("hook_attn_out", "hook_mlp_out"):
            name = f"blocks.{i}.{kind}"
            assert got[name].shape == (BATCH, SEQ, D)
            _close(got[name], ref["sites"][name])
            assert got[name].abs().max() > 1e-3  # not a degenerate zero tensor


def test_gemma2_post_norm_pitfall_is_handled() -> None:
    """TL's hook_attn_out / hook_mlp_out for Gemma-2 come *after* the post-norms."""
    subj = _build("gemma2")
    ids = _ids(2)
    ref = _reference("gemma2", subj.model, ids)
    got = subj.capture(ids, ALL_SITES)
    for i, block in enumerate(subj.model.model.layers):
        raw_attn, raw_mlp = ref["raw"][("attn", i)], ref["raw"][("mlp", i)]
        attn, mlp = got[f"blocks.{i}.hook_attn_out"], got[f"blocks.{i}.hook_mlp_out"]
        assert _differs(attn, raw_attn, by=1e-2), "hook_attn_out is the raw self_attn output"
        assert _differs(mlp, raw_mlp, by=1e-2), "hook_mlp_out is the raw mlp output"
        with torch.no_grad():
            _close(attn, block.post_attention_layernorm(raw_attn))
            _close(mlp, block.post_feedforward_layernorm(raw_mlp))


def test_block_decomposes_into_attn_plus_mlp(family: str, subj: Subject) -> None:
    ids = _ids(3)
    got = subj.capture(ids, ALL_SITES)
    ref = _reference(family, subj.model, ids)
    for i in range(N_LAYERS):
        pre, attn, mlp, post = (got[f"blocks.{i}.{k}"] for k in KINDS)
        _close(_block_sum(family, pre, attn, mlp), post)
        # and against HF's own stream, independent of Subject's captures
        _close(_block_sum(family, pre, attn, mlp), ref["sites"][f"blocks.{i}.hook_resid_post"])


def test_unembed_matches_model_logits(family: str, subj: Subject) -> None:
    ids = _ids(4)
    plain = _plain_logits(subj, ids)
    logits, got, _ = subj.forward(ids, capture=[f"blocks.{N_LAYERS - 1}.hook_resid_post"])
    torch.testing.assert_close(logits, plain, atol=0, rtol=0)
    resid = got[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    with torch.no_grad():
        _close(subj.unembed(resid), plain, atol=1e-5)
        # W_U / b_U are the LM head: final_norm(resid) @ W_U (+ b_U) gives the pre-cap logits
        raw = subj.final_norm(resid) @ subj.W_U
        if subj.b_U is not None:
            raw = raw + subj.b_U
        assert subj.W_U.shape == (D, VOCAB)
        cap = getattr(subj.model.config, "final_logit_softcapping", None)
        if family == "gemma2":
            assert cap == 1.0
            _close(torch.tanh(raw / cap) * cap, plain, atol=1e-5)
            assert _differs(raw, plain, by=1e-2)  # the soft-cap matters and was applied
        else:
            assert not cap
            _close(raw, plain, atol=1e-5)
        # unembed is a function of its input (not a cached result)
        assert _differs(subj.unembed(resid + _vec(0)), plain)


@pytest.mark.parametrize("identity", [lambda x: x, lambda x: x + 0], ids=["x", "x+0"])
def test_identity_edit_changes_no_logits(
    family: str, subj: Subject, identity: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    ids = _ids(5)
    plain = _plain_logits(subj, ids)
    for site in ALL_SITES:
        logits = subj.run_with_edit(ids, site, identity)
        torch.testing.assert_close(logits, plain, atol=0, rtol=0, msg=site)
    logits, _, _ = subj.forward(ids, edits={s: identity for s in ALL_SITES})
    torch.testing.assert_close(logits, plain, atol=0, rtol=0)
    assert _no_hooks_left(subj.model)


def test_nonzero_edit_changes_logits(family: str, subj: Subject) -> None:
    ids = _ids(6)
    v = _vec(1)
    plain = _plain_logits(subj, ids)
    for site in ALL_SITES:
        logits = subj.run_with_edit(ids, site, lambda x: x + v)
        assert _differs(logits, plain), site
    # the edited value is what flows on: an edit on the last resid_post is unembed(resid + v)
    last = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    resid = subj.capture(ids, [last])[last]
    with torch.no_grad():
        _close(subj.run_with_edit(ids, last, lambda x: x + v), subj.unembed(resid + v), atol=1e-5)
    # resid_post of L and resid_pre of L+1 are the same tensor, so the same edit is the same run
    for i in range(N_LAYERS - 1):
        a = subj.run_with_edit(ids, f"blocks.{i}.hook_resid_post", lambda x: x + v)
        b = subj.run_with_edit(ids, f"blocks.{i + 1}.hook_resid_pre", lambda x: x + v)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # edits are removed afterwards
    assert _no_hooks_left(subj.model)
    torch.testing.assert_close(_plain_logits(subj, ids), plain, atol=0, rtol=0)


@pytest.mark.parametrize("edit_site", ALL_SITES)
def test_edit_changes_only_later_sites(family: str, subj: Subject, edit_site: str) -> None:
    ids = _ids(7)
    v = _vec(2)
    clean = subj.capture(ids, ALL_SITES)
    _, edited, _ = subj.forward(ids, edits={edit_site: lambda x: x + v}, capture=ALL_SITES)
    target = subj.site(edit_site)
    for name in ALL_SITES:
        site = subj.site(name)
        parallel_sibling = (
            family == "neox_parallel"
            and target.kind == "hook_attn_out"
            and site.kind == "hook_mlp_out"
            and site.layer == target.layer
        )
        if site.order < target.order or parallel_sibling:
            # computed before the edit (or, in Pythia's parallel block, beside it)
            torch.testing.assert_close(edited[name], clean[name], atol=0, rtol=0, msg=name)
        else:
            assert _differs(edited[name], clean[name]), f"{name} unchanged by edit at {edit_site}"
    # the captured value at the edited site is the edited one
    _close(edited[edit_site], clean[edit_site] + v)


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_edit_enters_the_residual_as_given(family: str, subj: Subject, layer: int) -> None:
    """An attn_out edit is added to the residual unchanged (for Gemma-2: after the post-norm)."""
    ids = _ids(8)
    v = _vec(3)
    site = f"blocks.{layer}.hook_attn_out"
    clean = subj.capture(ids, ALL_SITES)
    _, ed, _ = subj.forward(ids, edits={site: lambda x: x + v}, capture=ALL_SITES)
    pre = clean[f"blocks.{layer}.hook_resid_pre"]
    block = _layers(family, subj.model)[layer]
    with torch.no_grad():
        mlp = _mlp_by_hand(family, block, pre, clean[site] + v)
    _close(ed[f"blocks.{layer}.hook_mlp_out"], mlp, atol=1e-5)
    _close(
        ed[f"blocks.{layer}.hook_resid_post"],
        _block_sum(family, pre, clean[site] + v, mlp),
        atol=1e-5,
    )


def test_capture_without_logits_stops_early(family: str, subj: Subject) -> None:
    ids = _ids(9)
    model = subj.model
    layers = _layers(family, model)
    calls: list[str] = []
    watch = {
        "lm_head": model.get_output_embeddings(),
        "last_block": layers[N_LAYERS - 1],
        "block1_attn": _raw_attn(family, layers[1]),
        "block0_mlp": layers[0].mlp,
    }
    handles = [
        m.register_forward_hook(lambda _m, _a, _o, k=k: calls.append(k)) for k, m in watch.items()
    ]
    try:
        sites = ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"]
        logits, got, pkv = subj.forward(ids, capture=sites, logits=False)
        assert logits is None and pkv is None
        assert calls == ["block0_mlp"], calls  # nothing above blocks.1.hook_resid_pre ran
        calls.clear()
        full_logits, full, _ = subj.forward(ids, capture=sites)
        assert full_logits is not None and "lm_head" in calls and "last_block" in calls
        calls.clear()
        via_capture = subj.capture(ids, sites)
        assert "lm_head" not in calls and "last_block" not in calls
    finally:
        for h in handles:
            h.remove()
    ref = _reference(family, model, ids)["sites"]
    for name in sites:
        torch.testing.assert_close(got[name], full[name], atol=0, rtol=0)
        torch.testing.assert_close(via_capture[name], full[name], atol=0, rtol=0)
        _close(got[name], ref[name])
    # stopping at the very last site skips only the final norm / head
    last = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    got = subj.capture(ids, [last])
    _close(got[last], ref[last])
    assert _no_hooks_left(model)


def test_kv_cache_matches_full_forward(family: str, subj: Subject) -> None:
    ids = _ids(10)
    full = _plain_logits(subj, ids)
    prefix_logits, _, pkv = subj.forward(ids[:, :-1], use_cache=True)
    assert pkv is not None
    _close(prefix_logits, full[:, :-1], atol=1e-5)
    step, _, pkv2 = subj.forward(ids[:, -1:], past_key_values=pkv, use_cache=True)
    assert step.shape == (BATCH, 1, VOCAB) and pkv2 is not None
    _close(step[:, -1], full[:, -1], atol=1e-5)
    # the cache is really used: the last token alone gives different logits
    alone, _, _ = subj.forward(ids[:, -1:])
    assert _differs(alone[:, -1], full[:, -1])


@pytest.mark.parametrize(
    "edit_site",
    [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
        "blocks.2.hook_resid_post",
    ],
)
def test_kv_cache_edit_on_last_step(family: str, subj: Subject, edit_site: str) -> None:
    ids = _ids(11)
    v = _vec(4)
    last_only = torch.zeros(SEQ, 1)
    last_only[-1] = 1.0
    full, _, _ = subj.forward(ids, edits={edit_site: lambda x: x + v * last_only})
    clean, _, _ = subj.forward(ids)
    assert _differs(full[:, -1], clean[:, -1])
    # earlier positions are untouched by an edit at the last position (causality)
    _close(full[:, :-1], clean[:, :-1], atol=0)
    _, _, pkv = subj.forward(ids[:, :-1], use_cache=True)
    step, got, _ = subj.forward(
        ids[:, -1:],
        edits={edit_site: lambda x: x + v},
        capture=[edit_site],
        past_key_values=pkv,
        use_cache=True,
    )
    assert got[edit_site].shape == (BATCH, 1, D)
    _close(step[:, -1], full[:, -1], atol=1e-5)


BAD_SITES = [
    "blocks.0.hook_resid_mid",
    "blocks.0.attn.hook_z",
    "hook_embed",
    "blocks.-1.hook_resid_pre",
    "blocks.x.hook_resid_pre",
    "blocks.0.hook_resid_pre.extra",
    "layers.0.hook_resid_post",
    "",
]


@pytest.mark.parametrize("name", BAD_SITES)
def test_unknown_site_raises(name: str) -> None:
    subj = _build("llama")
    with pytest.raises(SteerscopeError) as exc:
        subj.site(name)
    assert f"'{name}'" in str(exc.value) and "unknown hook site" in str(exc.value)


@pytest.mark.parametrize("layer", [N_LAYERS, N_LAYERS + 7, 100])
@pytest.mark.parametrize("kind", KINDS)
def test_out_of_range_site_raises(family: str, subj: Subject, layer: int, kind: str) -> None:
    name = f"blocks.{layer}.{kind}"
    with pytest.raises(SteerscopeError) as exc:
        subj.site(name)
    msg = str(exc.value)
    assert f"'{name}'" in msg and "out of range" in msg and str(N_LAYERS) in msg
    # the last valid block is accepted
    assert subj.site(f"blocks.{N_LAYERS - 1}.{kind}").layer == N_LAYERS - 1


def test_bad_sites_raise_through_every_entry_point(family: str, subj: Subject) -> None:
    ids = _ids(12)
    good = "blocks.0.hook_resid_post"
    for bad in (f"blocks.{N_LAYERS}.hook_resid_post", "blocks.0.hook_nope"):
        with pytest.raises(SteerscopeError, match=bad.replace(".", r"\.")):
            subj.capture(ids, [good, bad])
        with pytest.raises(SteerscopeError, match=bad.replace(".", r"\.")):
            subj.run_with_edit(ids, bad, lambda x: x)
        with pytest.raises(SteerscopeError, match=bad.replace(".", r"\.")):
            subj.forward(ids, edits={good: lambda x: x + 1}, capture=[bad])
        assert _no_hooks_left(subj.model)


def test_failing_edit_leaves_no_hooks(family: str, subj: Subject) -> None:
    ids = _ids(13)

    def boom(_x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        subj.forward(ids, edits={"blocks.1.hook_mlp_out": boom}, capture=ALL_SITES)
    assert _no_hooks_left(subj.model)
    plain = _plain_logits(subj, ids)
    torch.testing.assert_close(subj.forward(ids)[0], plain, atol=0, rtol=0)
