"""Steered generation: batched == unbatched, KV cache == full re-forward, seeds, stop strings.

The reference implementations here are deliberately naive (one row, no cache, the edit written
out by hand) so they check the decoding loop of steerscope.generation, not reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_llama, tiny_sae

from steerscope.errors import SteerscopeError
from steerscope.generation import (
    Request,
    Sampling,
    generate,
    generate_requests,
    position_policy,
)
from steerscope.interventions import AdditiveSteer, ClampLatent

D, VOCAB = 32, 64
PROMPTS = [(1, 5, 9, 13), (1, 7), (1, 20, 21, 22, 23, 24, 25), (1, 3, 3)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def subject():
    return tiny_llama(d_model=D, vocab=VOCAB, seed=1)


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(D, 48, hook="blocks.0.hook_resid_post", seed=2)


def _mixed_requests() -> list[Request]:
    ops = [
        None,
        AdditiveSteer(3, 2.0, positions="last"),
        AdditiveSteer(5, 1.5, positions="all"),
        AdditiveSteer(7, 1.0, positions=1),
        AdditiveSteer(9, 1.2, positions="last", scale="position_max"),
        ClampLatent(11, 4.0, positions="last"),
        AdditiveSteer(2, 3.0, unit=True, positions="last"),
    ]
    return [Request(p, op, seed=10 * i + j) for i, p in enumerate(PROMPTS)
            for j, op in enumerate(ops)]


SAMPLED = Sampling(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.95, seed=0,
                   stop_at_eos=False)
GREEDY = Sampling(max_new_tokens=8, temperature=0.0, stop_at_eos=False)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batched_equals_unbatched(subject, sae, sampling) -> None:
    reqs = _mixed_requests()
    batched = generate_requests(subject, reqs, sampling, sae, batch_size=64)
    small = generate_requests(subject, reqs, sampling, sae, batch_size=3)
    alone = [generate_requests(subject, [r], sampling, sae)[0] for r in reqs]
    for b, s, a in zip(batched, small, alone, strict=True):
        assert b.tokens == a.tokens == s.tokens
        assert len(b.tokens) == sampling.max_new_tokens
    # steering changed something, and rows without an op are the unsteered generation
    assert len({tuple(g.tokens) for g in batched[:7]}) > 1
    clean = generate_requests(subject, [Request(p, seed=10 * i) for i, p in enumerate(PROMPTS)],
                              sampling)
    assert [c.tokens for c in clean] == [batched[7 * i].tokens for i in range(len(PROMPTS))]


def _naive_steered(subject, sae, prompt, op, n_new: int) -> list[int]:
    """Greedy, no cache, one row: every step re-runs the whole sequence and adds the steering
    vector by hand at the positions the KV-cache protocol steers (prompt policy + all new)."""
    seq = list(prompt)
    t = len(prompt)
    pol = position_policy(op)
    start = t - 1 if pol == "last" else 0 if pol == "all" else int(pol)
    vec = op.vector(sae)
    out = []
    for _ in range(n_new):
        n = len(seq)

        def edit(x, _n=n):
            x = x.clone()
            x[:, start:_n] += vec
            return x

        logits, _, _ = subject.forward(torch.tensor([seq]), edits={sae.hook: edit})
        nxt = int(logits[0, -1].argmax())
        seq.append(nxt)
        out.append(nxt)
    return out


@pytest.mark.parametrize("positions", ["last", "all", 2])
def test_kv_cache_equals_full_reforward(subject, sae, positions) -> None:
    op = AdditiveSteer(4, 2.5, positions=positions)
    reqs = [Request(p, op) for p in PROMPTS]
    cached = generate_requests(subject, reqs, GREEDY, sae)
    nocache = generate_requests(subject, reqs, GREEDY, sae, use_cache=False)
    for p, c, n in zip(PROMPTS, cached, nocache, strict=True):
        assert c.tokens == n.tokens == _naive_steered(subject, sae, p, op, GREEDY.max_new_tokens)


def _naive_arad(subject, sae, prompt, feature, s, n_new: int) -> list[int]:
    """Arad's hook written out (methods.md §1.1), greedy, no cache, one row: at the prompt's
    last position and at every generated position, ``a_f += s · max_j a_j`` with the SAE error
    kept, i.e. ``x += s · max_j a_j(x) · W_dec[f]`` (the decoder is linear)."""
    seq = list(prompt)
    start = len(prompt) - 1
    out = []
    for _ in range(n_new):
        def edit(x):
            a = sae.encode(x)
            err = x - sae.decode(a)
            a = a.clone()
            a[:, start:, feature] += s * a[:, start:, :].max(-1).values
            return sae.decode(a) + err

        logits, _, _ = subject.forward(torch.tensor([seq]), edits={sae.hook: edit})
        nxt = int(logits[0, -1].argmax())
        seq.append(nxt)
        out.append(nxt)
    return out


def test_arad_position_max_equals_naive_reforward(subject, sae) -> None:
    ops = [AdditiveSteer(f, s, positions="last", scale="position_max")
           for f, s in ((9, 1.2), (4, 3.0), (30, 8.0), (9, 0.4))]
    reqs = [Request(p, op) for p in PROMPTS for op in ops]
    got = generate_requests(subject, reqs, GREEDY, sae)  # one batch, every row its own op
    want = [_naive_arad(subject, sae, r.prompt, r.op.feature, r.op.strength,
                        GREEDY.max_new_tokens) for r in reqs]
    assert [g.tokens for g in got] == want
    clean = generate_requests(subject, [Request(p) for p in PROMPTS], GREEDY)
    assert any(g.tokens != clean[i // len(ops)].tokens for i, g in enumerate(got))


def test_kv_cache_equals_no_cache_for_every_operator(subject, sae) -> None:
    reqs = _mixed_requests()
    a = generate_requests(subject, reqs, SAMPLED, sae)
    b = generate_requests(subject, reqs, SAMPLED, sae, use_cache=False)
    assert [g.tokens for g in a] == [g.tokens for g in b]


@dataclass(frozen=True)
class _Custom:
    """An operator generation has never heard of: falls back to its own edit()."""

    feature: int
    strength: float
    positions: str = "last"

    def edit(self, sae):
        v = self.strength * sae.W_dec[self.feature].detach()
        pos = self.positions

        def apply(x):
            out = x.clone()
            if pos == "all":
                return x + v
            out[:, -1] += v
            return out

        return apply


def test_unknown_operator_falls_back_to_its_edit(subject, sae) -> None:
    ref = [Request(p, AdditiveSteer(6, 2.0, positions="last")) for p in PROMPTS]
    custom = [Request(p, _Custom(6, 2.0)) for p in PROMPTS]
    mixed = [ref[0], custom[1], ref[2], custom[3]]
    a = generate_requests(subject, ref, GREEDY, sae)
    b = generate_requests(subject, custom, GREEDY, sae)
    c = generate_requests(subject, mixed, GREEDY, sae)
    assert [g.tokens for g in a] == [g.tokens for g in b] == [g.tokens for g in c]


def test_seeds(subject, sae) -> None:
    r = [Request(PROMPTS[0], None, seed=s) for s in range(6)]
    a = generate_requests(subject, r, SAMPLED)
    b = generate_requests(subject, r, SAMPLED)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert len({tuple(g.tokens) for g in a}) > 1  # different seeds, different samples
    # a request without its own seed uses Sampling.seed
    c = generate_requests(subject, [Request(PROMPTS[0])], SAMPLED)
    assert c[0].tokens == a[0].tokens


def test_top_k_one_is_greedy(subject) -> None:
    s = Sampling(max_new_tokens=6, temperature=1.3, top_k=1, seed=3, stop_at_eos=False)
    reqs = [Request(p) for p in PROMPTS]
    greedy = generate_requests(subject, reqs, Sampling(max_new_tokens=6, stop_at_eos=False))
    assert [g.tokens for g in generate_requests(subject, reqs, s)] == [g.tokens for g in greedy]


def test_eos_ends_a_row_and_is_dropped(subject) -> None:
    greedy = generate_requests(subject, [Request(PROMPTS[0])], GREEDY)[0].tokens
    eos = greedy[2]
    subject.model.config.eos_token_id, old = eos, subject.model.config.eos_token_id
    try:
        g = generate_requests(subject, [Request(PROMPTS[0]), Request(PROMPTS[1])],
                              Sampling(max_new_tokens=8))
    finally:
        subject.model.config.eos_token_id = old
    assert g[0].finish == "eos" and g[0].tokens == greedy[:2]


def test_stop_string_and_real_tokenizer(real_subject) -> None:
    s = Sampling(max_new_tokens=30, temperature=0.0, stop=(".",))
    prompts = ["Once upon a time, there was a little ", "One day, "]
    gens = generate_requests(real_subject, [Request(p) for p in prompts], s)
    for g in gens:
        assert g.finish == "stop"
        assert "." in g.text
        # the stop token is the first one whose text completes a '.'
        tok = real_subject.tokenizer
        assert "." not in tok.decode(g.tokens[:-1])
        assert g.prompt_ids[0] == tok.bos_token_id
    texts = generate(real_subject, prompts, s)
    assert texts == [g.text for g in gens]


def test_bad_input(subject, sae) -> None:
    with pytest.raises(SteerscopeError, match="no prompt"):
        generate_requests(subject, [], GREEDY)
    with pytest.raises(SteerscopeError, match="needs an SAE"):
        generate_requests(subject, [Request(PROMPTS[0], AdditiveSteer(1, 1.0))], GREEDY)
    with pytest.raises(SteerscopeError, match="out of range"):
        generate_requests(subject, [Request(PROMPTS[0], AdditiveSteer(999, 1.0))], GREEDY, sae)
    with pytest.raises(SteerscopeError, match="top_p"):
        generate_requests(subject, [Request(PROMPTS[0])], Sampling(temperature=1, top_p=1.5))
    with pytest.raises(SteerscopeError, match="vocabulary"):
        generate_requests(subject, [Request((1, VOCAB + 5))], GREEDY)
    with pytest.raises(SteerscopeError, match="position policy"):
        position_policy(AdditiveSteer(1, 1.0, positions="middle"))  # type: ignore[arg-type]


def _family_model(family: str):
    """GPT-2: learned absolute positions (position ids must skip the padding); NeoX: rotary;
    Gemma-2: a sliding window (4) shorter than prompt + generation."""
    from families import make_model

    from steerscope.subject import Subject

    torch.manual_seed(0)
    base = {"gpt_neox": "neox_parallel"}.get(family, family)
    overrides = {"head_dim": 8, "query_pre_attn_scalar": 8} if family == "gemma2" else {}
    model = make_model(base, vocab=VOCAB, d=D, n_layers=2, window=4, attn=None, **overrides)
    return Subject(model.eval())


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gemma2"])
def test_batched_equals_unbatched_other_families(family: str) -> None:
    subject = _family_model(family)
    sae = tiny_sae(D, 48, hook="blocks.1.hook_resid_post", seed=2)
    prompts = [*PROMPTS, (1, 4, 5, 6, 7, 8, 9, 10, 11)]
    reqs = [Request(p, op, seed=i) for i, p in enumerate(prompts)
            for op in (None, AdditiveSteer(3, 2.0, positions="last"),
                       AdditiveSteer(4, 1.0, positions="all"))]
    batched = generate_requests(subject, reqs, SAMPLED, sae)
    alone = [generate_requests(subject, [r], SAMPLED, sae)[0] for r in reqs]
    nocache = generate_requests(subject, reqs, SAMPLED, sae, use_cache=False)
    assert [g.tokens for g in batched] == [g.tokens for g in alone] == [g.tokens for g in nocache]
