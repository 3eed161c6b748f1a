"""GenSuccess, perplexity, distinct-n, logit lens, output score, strength choice, filter curves —
each against a hand-built case or a naive recomputation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_llama, tiny_sae

from steerscope.errors import SteerscopeError
from steerscope.filtering import (
    filter_curve,
    filter_experiment,
    load_prefixes,
    output_scores,
    split_prefixes,
)
from steerscope.gen_metrics import (
    distinct_n,
    gen_success,
    gen_success_at_k,
    logit_lens_from_table,
    logit_lens_topk,
    perplexities,
    select_strengths,
)

D, VOCAB = 32, 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def subject():
    return tiny_llama(d_model=D, vocab=VOCAB, seed=3)


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(D, 40, seed=4)


def test_gen_success_hand_built() -> None:
    top = [5, 9, 11]  # the feature's logit-lens set, in rank order
    gens = [[5, 7, 5, 9], [1, 2, 3], [11]]
    assert gen_success(gens[0], top) == 3  # a count with repeats, not a rate
    assert gen_success_at_k(gens, top) == pytest.approx((3 + 0 + 1) / 3)
    assert gen_success_at_k(gens, top, k=1) == pytest.approx(2 / 3)  # only token 5 counts
    with pytest.raises(SteerscopeError):
        gen_success_at_k([], top)


def test_distinct_n_hand_built() -> None:
    assert distinct_n([[1, 2, 1, 2]], 1) == pytest.approx(2 / 4)
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # (1,2),(2,1),(1,2)
    assert distinct_n([[1, 2], [1, 2]], 2) == pytest.approx(1 / 2)  # pooled over generations
    assert math.isnan(distinct_n([[1]], 2))


def test_logit_lens_topk_matches_naive(subject, sae) -> None:
    got = logit_lens_topk(subject, sae, k=5)
    with torch.no_grad():
        normed = subject.final_norm(sae.W_dec)
        probs = torch.softmax(normed @ subject.lm_head.weight.T, -1)
    want = probs.topk(5, -1).indices
    assert torch.equal(got, want)
    sub = logit_lens_topk(subject, sae, k=5, features=[3, 0])
    assert torch.equal(sub, want[[3, 0]])
    table = pd.DataFrame({"feature": range(sae.d_sae), "logit_lens_top20": want.tolist()})
    assert torch.equal(logit_lens_from_table(table, [3, 0], 5), want[[3, 0]])


def test_perplexity_is_exp_mean_nll(subject) -> None:
    prompts = [[1, 4, 8], [1, 2], [1, 9, 9, 9, 3]]
    gens = [[10, 11, 12], [5], []]
    got = perplexities(subject, prompts, gens, batch_size=2)
    for p, g, val in zip(prompts, gens, got, strict=True):
        if not g:
            assert math.isnan(val)
            continue
        nll = []
        for j, t in enumerate(g):  # one unpadded forward per generated token
            ctx = torch.tensor([p + g[:j]])
            with torch.no_grad():
                logits = subject.model(input_ids=ctx).logits[0, -1]
            nll.append(-float(torch.log_softmax(logits.double(), -1)[t]))
        assert val == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_output_score_matches_naive(subject, sae) -> None:
    prompt = [1, 6, 7, 8]
    feats = [0, 5, 17]
    top = logit_lens_topk(subject, sae, k=4, features=feats)
    got = output_scores(subject, sae, feats, top, prompt=prompt, factor=10.0)
    for f, tt, val in zip(feats, top, got, strict=True):
        def hook(x, _f=f):  # Arad's AmlifySAEHook at the last position, error kept
            a = sae.encode(x)
            err = x - sae.decode(a)
            a = a.clone()
            a[:, -1, _f] += 10.0 * a[:, -1, :].max()
            return sae.decode(a) + err
        logits, _, _ = subject.forward(torch.tensor([prompt]), edits={sae.hook: hook})
        p = torch.softmax(logits[0, -1].double(), -1)
        rank = torch.argsort(torch.argsort(-p))
        want = (1 - rank[tt].min().item() / len(p)) * p[tt].max().item()
        assert val == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_strength_selection_rule_on_hand_made_table() -> None:
    t = pd.DataFrame([
        # feature 0: s=4 has the best GS/PPL but GS > 3 → dropped; s=2 beats s=1
        (0, 1.0, 1.0, 10.0), (0, 2.0, 2.5, 12.0), (0, 4.0, 3.5, 11.0),
        # feature 1: GS 0 everywhere → tie → smallest strength (why 0.2 dominates in the paper)
        (1, 0.5, 0.0, 9.0), (1, 1.0, 0.0, 8.0),
        # feature 2: every strength over 3 → no strength
        (2, 1.0, 3.5, 9.0), (2, 2.0, 4.0, 9.0),
        # feature 3: lower GS but much lower perplexity wins
        (3, 1.0, 1.0, 5.0), (3, 2.0, 2.0, 20.0),
    ], columns=["feature", "strength", "gen_success", "perplexity"])
    sel = select_strengths(t).set_index("feature")
    assert sel.loc[0, "strength"] == 2.0
    assert sel.loc[1, "strength"] == 0.5
    assert np.isnan(sel.loc[2, "strength"]) and sel.loc[2, "n_eligible"] == 0
    assert sel.loc[3, "strength"] == 1.0
    # score = (GS / max GS) / (PPL / max PPL), maxima over all rows (4.0 and 20.0)
    assert sel.loc[0, "score"] == pytest.approx((2.5 / 4.0) / (12.0 / 20.0))
    with pytest.raises(SteerscopeError, match="feature 2: 1→3.50, 2→4.00"):
        select_strengths(t, on_empty="raise")
    with pytest.raises(SteerscopeError, match=r"every strength was filtered out.*all"):
        select_strengths(t[t["feature"] == 2])


def test_filter_curve_and_random_baseline() -> None:
    rng = np.random.default_rng(0)
    s_out = rng.uniform(size=400)
    gs = 2.0 * (s_out > 0.5) + rng.normal(0, 0.1, size=400)  # high score → high GenSuccess
    curve = filter_curve(gs, [s_out >= 0.0, s_out >= 0.5, s_out >= 2.0], [0.0, 0.5, 2.0],
                         n_boot=300, n_random=300)
    allf, half, none = curve
    assert allf["n"] == 400 and allf["ratio"] == pytest.approx(1.0)
    assert half["n"] == int((s_out >= 0.5).sum())
    assert half["mean"] == pytest.approx(gs[s_out >= 0.5].mean())
    assert half["ci_lo"] < half["mean"] < half["ci_hi"]
    assert half["random_lo"] < gs.mean() < half["random_hi"]  # random subsets ≈ overall mean
    assert half["p_random"] == 0.0 and half["ratio_lo"] > 1.5
    assert none["n"] == 0 and none["mean"] is None
    res = filter_experiment(pd.DataFrame({"gen_success": gs, "output_score": s_out,
                                          "clean_score": gs + rng.normal(0, 1, 400)}),
                            thresholds=(0.1, 0.5, 0.9), n_boot=100, n_random=100)
    assert res["headline"]["threshold"] == 0.9 and "both" in res and len(res["clean_score"]) == 5


def test_prefixes(tmp_path: Path) -> None:
    general = load_prefixes("general")
    assert len(general) == 50 and general[0] == "Findings show that"
    assert "In my experience," in general
    ts = load_prefixes("tinystories")
    assert ts[0] == "Once upon a time, "  # trailing space kept
    f = tmp_path / "p.txt"
    f.write_text("# comment\nA \n\nB\n")
    assert load_prefixes(f) == ["A ", "B"]
    f.write_text("# only a comment\n\n")
    with pytest.raises(SteerscopeError, match="empty"):
        load_prefixes(f)
    with pytest.raises(SteerscopeError, match="does not exist"):
        load_prefixes(tmp_path / "nope.txt")
    split = split_prefixes(5, seed=0)
    assert sorted(split.tolist()) == ["report"] * 2 + ["select"] * 3
    with pytest.raises(SteerscopeError, match="two prefixes"):
        split_prefixes(1, seed=0)
