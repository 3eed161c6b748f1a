"""The paper's qualitative findings (methods.md §3.5) on the real TinyStories-656K model.

Each expectation states its tolerance up front. Where the tiny model disagrees with the paper
the test stays as the paper states it and is marked ``xfail(strict=True)`` with the measured
numbers, so a change in behaviour (either way) is noticed. Finding 4 (e2e vs local SAEs) has no
test: no end-to-end SAE exists for this model.
"""

from __future__ import annotations

import math

import pytest

from steerscope.sensitivity import SensitivityConfig, findings, run_sensitivity
from steerscope.subject import Subject

SITE = "blocks.0.hook_resid_post"
LENGTHS = (0.005, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def contexts(real_subject: Subject):
    from steerscope.assets import corpus_path
    from steerscope.corpus import load_contexts

    ctx = load_contexts(real_subject.tokenizer, corpus_path("tinystories-train.txt"), 48,
                        max_contexts=16 + 128)
    return ctx.ids[:16], ctx.ids[16:]


@pytest.fixture(scope="module")
def baseline(real_subject: Subject, contexts):
    cfg = SensitivityConfig(lengths=LENGTHS, runs=2, sae_families=(), substitutions=(),
                            n_boot=500)
    result = run_sensitivity(real_subject, *contexts, SITE, (), cfg)
    t = result.table
    mean = t.groupby(["family", "length_rel"])["kl_mean"].mean()
    return result, mean, findings(t)


def test_mixture_directions_are_not_confounded_by_minus_x(baseline) -> None:
    """Tolerance: |mean cos(u, −x)| < 0.05 for mixtures; > 0.3 for every difference family."""
    cos = baseline[2]["cos_minus_x"]
    for fam in ("isotropic", "cov_mixture", "real_mixture"):
        assert abs(cos[fam]) < 0.05, (fam, cos[fam])
    for fam in ("isotropic_difference", "cov_difference", "real_difference"):
        assert cos[fam] > 0.3, (fam, cos[fam])


def test_cov_mixture_moves_output_more_than_isotropic(baseline) -> None:
    """At every length the run-averaged cov-mixture KL exceeds the isotropic KL."""
    mean = baseline[1]
    for length in LENGTHS:
        assert mean[("cov_mixture", length)] > mean[("isotropic", length)], length


@pytest.mark.xfail(strict=True, reason=(
    "TinyStories-656K at blocks.0.hook_resid_post: cov-mixture / isotropic KL is only about "
    "1.2 at every length, not the 'much larger' effect the paper reports for GPT-2 layer 6"))
def test_cov_mixture_moves_output_much_more_than_isotropic(baseline) -> None:
    """The paper's magnitude: 'much more' read as at least 2× at every length."""
    mean = baseline[1]
    for length in LENGTHS:
        assert mean[("cov_mixture", length)] >= 2 * mean[("isotropic", length)], length


def test_real_mixture_matches_cov_mixture(baseline) -> None:
    """'Minimal practical difference': real / cov-mixture KL within a factor 1.5 everywhere."""
    mean = baseline[1]
    for length in LENGTHS:
        r = mean[("real_mixture", length)] / mean[("cov_mixture", length)]
        assert 1 / 1.5 <= r <= 1.5, (length, r)


def test_difference_directions_exaggerate_real_vs_random(baseline) -> None:
    """The flaw: at the largest length, real/cov is larger with −x in the direction than
    without it (the 'real directions are special' effect shrinks once x is not subtracted)."""
    f = baseline[2]
    diff = f["real_difference_over_cov_difference"]["ratio"][-1]
    mix = f["real_mixture_over_cov_mixture"]["ratio"][-1]
    assert diff > mix, (diff, mix)


def test_small_perturbations_are_quadratic(baseline) -> None:
    """KL ≈ ½ L² uᵀFu for small L: doubling L from 0.005 to 0.01 × median quadruples KL
    (tolerance ±10 %) for every mixture family."""
    mean = baseline[1]
    for fam in ("isotropic", "cov_mixture", "real_mixture"):
        ratio = mean[(fam, 0.01)] / mean[(fam, 0.005)]
        assert ratio == pytest.approx(4.0, rel=0.1), (fam, ratio)


# ---------------------------------------------------------------------------- SAE findings
@pytest.fixture(scope="module")
def sae_findings(real_subject: Subject, contexts):
    from steerscope.sensitivity.pipeline import load_saes

    saes, _ = load_saes(None, SITE)
    if len(saes) < 2:
        pytest.skip(f"need the embedded SAEs at {SITE} (found {len(saes)})")
    cfg = SensitivityConfig(lengths=(0.1, 0.3), runs=1, families=("cov_mixture",),
                            sae_families=("sae_active",), n_boot=200,
                            substitutions=("substitution", "eps_cov_mixture", "eps_isotropic"))
    result = run_sensitivity(real_subject, *contexts, SITE, saes, cfg)
    return findings(result.table, reference_length=0.3)


def test_sae_substitution_is_not_pathological(sae_findings) -> None:
    """KL(x → SAE(x)) / KL(ε cov-mixture) < 2.2, the bottom of Gurnee's 2.2–4.5× range."""
    for sae, entry in sae_findings["saes"].items():
        ratio = entry["substitution_over_eps_cov_mixture"]
        assert math.isfinite(ratio) and ratio < 2.2, (sae, ratio)


@pytest.mark.xfail(strict=True, reason=(
    "TinyStories-656K at blocks.0.hook_resid_post with the embedded SAEs: active-feature KL at "
    "0.3 × median norm rises with L0 (JumpReLU L0 26.9 → 0.336, TopK L0 32 → 0.356, ReLU L0 33.3 "
    "→ 0.408), the opposite of the paper's ordering; the three L0s span only 27–33 and differ in "
    "architecture, so L0 is confounded with the activation function here"))
def test_lower_l0_feature_directions_move_output_more(sae_findings) -> None:
    """Active-feature KL at 0.3 × median norm strictly decreases with the SAE's L0."""
    pairs = sae_findings["active_kl_by_l0"]  # sorted by L0
    kls = [p["kl"] for p in pairs]
    assert all(a > b for a, b in zip(kls, kls[1:], strict=False)), pairs
