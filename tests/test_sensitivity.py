"""Sensitivity sweeps on tiny random models: closed forms and equivalence to naive computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_llama, tiny_sae

from steerscope.errors import SteerscopeError
from steerscope.sensitivity import (
    BASE_FAMILIES,
    SUBSTITUTIONS,
    AllPositionsRunner,
    LastPositionRunner,
    SensitivityConfig,
    base_directions,
    bootstrap_mean_ci,
    check_lengths,
    error_directions,
    feature_categories,
    feature_directions,
    findings,
    kl_per_token,
    naive_forward_kl,
    run_sensitivity,
    site_statistics,
    substitute,
)
from steerscope.sensitivity.directions import unit
from steerscope.sensitivity.figures import render_html
from steerscope.sensitivity.runner import layer_ceiling, skip_blocks
from steerscope.subject import Subject

SITE = "blocks.0.hook_resid_post"


def _ids(n: int, t: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    ids[:, 0] = 1
    return ids


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama3() -> Subject:
    return tiny_llama(n_layers=3)


# ---------------------------------------------------------------------------- statistics
def test_site_statistics_match_numpy() -> None:
    acts = torch.randn(4, 50, 8) * torch.linspace(0.5, 3, 8) + 2.0
    acts[:, 0] = 100.0  # BOS outlier must not enter
    s = site_statistics(acts, "x")
    flat = acts[:, 1:].reshape(-1, 8).double().numpy()
    assert s.n_tokens == 4 * 49
    np.testing.assert_allclose(s.mean.numpy(), flat.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.cov.numpy(), np.cov(flat.T) + 0.01 * np.eye(8), rtol=1e-4,
                               atol=1e-5)
    assert s.median_norm == pytest.approx(float(np.median(np.linalg.norm(flat, axis=1))), 1e-5)
    draws = s.sample(40_000, torch.Generator().manual_seed(0)).double().numpy()
    np.testing.assert_allclose(draws.mean(0), flat.mean(0), atol=0.05)
    np.testing.assert_allclose(np.cov(draws.T), s.cov.numpy(), atol=0.1 * float(s.cov.max()))


def test_covariance_needs_enough_tokens_or_shrinkage() -> None:
    acts = torch.randn(2, 5, 16)  # 8 tokens after BOS, d = 16
    with pytest.raises(SteerscopeError, match="at least 17") as exc:
        site_statistics(acts, "blocks.0.hook_resid_post")
    assert "shrinkage" in str(exc.value) and "8 tokens" in str(exc.value)
    auto = site_statistics(acts, shrinkage="auto")
    assert 0 < auto.shrinkage <= 1
    assert bool((torch.linalg.eigvalsh(auto.cov.double()) > 0).all())
    half = site_statistics(acts, shrinkage=0.5, ridge=0.0)
    x = acts[:, 1:].reshape(-1, 16).double()
    s = torch.cov(x.T)
    expected = 0.5 * s + 0.5 * torch.trace(s) / 16 * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(half.cov.double(), expected, rtol=1e-4, atol=1e-5)
    for bad in (0.0, 1.5, math.nan, "lw"):
        with pytest.raises(SteerscopeError):
            site_statistics(acts, shrinkage=bad)  # type: ignore[arg-type]


def test_kl_closed_form() -> None:
    clean = torch.log_softmax(torch.tensor([[0.0, math.log(3.0)]]), -1)  # p = (1/4, 3/4)
    kl = kl_per_token(clean, torch.tensor([[0.0, 0.0]]))  # q = (1/2, 1/2)
    assert float(kl) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    logits = torch.randn(5, 7, 30)
    lp = torch.log_softmax(logits, -1)
    assert float(kl_per_token(lp, logits).abs().max()) < 1e-6
    other = torch.randn(5, 7, 30)
    naive = (lp.exp() * (lp - torch.log_softmax(other, -1))).sum(-1)
    torch.testing.assert_close(kl_per_token(lp, other), naive)
    assert bool((kl_per_token(lp, other) >= -1e-6).all())


def test_bootstrap_ci() -> None:
    mean, lo, hi = bootstrap_mean_ci(np.full((20, 5), 0.3))
    assert mean == lo == hi == pytest.approx(0.3)
    rng = np.random.default_rng(1)
    v = rng.normal(2.0, 1.0, size=400)
    mean, lo, hi = bootstrap_mean_ci(v, n_boot=4000, seed=3)
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size)
    assert mean == pytest.approx(v.mean())
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < mean < hi
    # Cluster bootstrap: a context's tokens move together, so the CI is that of context means.
    per_ctx = rng.normal(0, 1, size=(30, 1)) + rng.normal(0, 0.01, size=(30, 50))
    m, lo2, hi2 = bootstrap_mean_ci(per_ctx, n_boot=4000)
    assert (hi2 - lo2) / 2 == pytest.approx(1.96 * per_ctx.mean(1).std(ddof=1) / math.sqrt(30),
                                            rel=0.15)


def test_check_lengths() -> None:
    assert check_lengths([1, 2.5]) == (1.0, 2.5)
    for bad in ([], [0.0], [-1.0], [math.inf], [math.nan], ["a"]):
        with pytest.raises(SteerscopeError):
            check_lengths(bad)


# ---------------------------------------------------------------------------- directions
@pytest.fixture(scope="module")
def stats_and_x():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(20, 30, 16, generator=g) * torch.linspace(0.2, 4, 16) + 3.0
    stats = site_statistics(acts, "s")
    x = torch.randn(500, 16, generator=g) * torch.linspace(0.2, 4, 16) + 3.0
    return stats, x


def test_direction_families_are_unit_and_mixtures_ignore_x(stats_and_x) -> None:
    stats, x = stats_and_x
    for fam in BASE_FAMILIES:
        u = base_directions(fam, x, stats, torch.Generator().manual_seed(1))
        assert u.shape == x.shape
        torch.testing.assert_close(u.norm(dim=-1), torch.ones(len(x)))
        cos = float((u * unit(-x)).sum(-1).mean())
        if fam in ("isotropic", "cov_mixture", "real_mixture"):
            assert abs(cos) < 0.08, (fam, cos)  # symmetric in sign: no −x component
        else:
            assert cos > 0.2, (fam, cos)  # toward a target: contains −x


def test_real_difference_points_at_a_real_activation(stats_and_x) -> None:
    stats, x = stats_and_x
    u = base_directions("real_difference", x, stats, torch.Generator().manual_seed(2))
    # x + t·u hits a pool row for t = ‖y − x‖: the closest pool row to the ray is at distance 0.
    t = ((stats.acts[None] - x[:, None]) * u[:, None]).sum(-1)  # [N, pool] projection
    resid = (x[:, None] + t[..., None] * u[:, None] - stats.acts[None]).norm(dim=-1)
    assert float(resid.min(dim=1).values.max()) < 1e-3


def test_feature_categories_and_directions() -> None:
    sae = tiny_sae(16, 64)
    with torch.no_grad():
        sae.module.b_enc[:8] = -100.0  # dead
    g = torch.Generator().manual_seed(0)
    stats_acts, sweep = torch.randn(300, 16, generator=g), torch.randn(5, 16, generator=g)
    with torch.no_grad():
        sae.module.b_enc[8:12] = -3.0  # rare: alive on 300 tokens, maybe not on 5
    c = feature_categories(sae, stats_acts, sweep)
    a_stats, a_sweep = sae.encode(stats_acts) > 1e-8, sae.encode(sweep) > 1e-8
    assert set(c.active.tolist()) == set(torch.where(a_sweep.any(0))[0].tolist())
    assert set(c.dead.tolist()) == set(torch.where(~(a_stats.any(0) | a_sweep.any(0)))[0].tolist())
    assert set(range(8)) <= set(c.dead.tolist())
    assert len(c.inactive) > 0
    assert sorted(torch.cat([c.active, c.inactive, c.dead]).tolist()) == list(range(64))
    assert c.l0 == pytest.approx(float((sae.encode(stats_acts) != 0).sum(-1).float().mean()))
    u, f = feature_directions(sae, c.inactive, 100, torch.Generator().manual_seed(0))
    assert set(f.tolist()) <= set(c.inactive.tolist())
    torch.testing.assert_close(u, unit(sae.W_dec[f].detach()))
    with pytest.raises(SteerscopeError):
        feature_directions(sae, torch.empty(0, dtype=torch.long), 3, g)


def test_substitution_closed_forms(stats_and_x) -> None:
    stats, x = stats_and_x
    sae = tiny_sae(16, 64)
    recon = sae.reconstruct(x)
    g = torch.Generator().manual_seed(0)
    eps = (recon - x).norm(dim=-1)
    xn, rn = x.norm(dim=-1), recon.norm(dim=-1)

    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (unit(a) * unit(b)).sum(-1)

    out = {t: substitute(t, x, recon, stats, g) for t in SUBSTITUTIONS}
    torch.testing.assert_close(out["substitution"], recon)
    torch.testing.assert_close(out["norm_corrected"].norm(dim=-1), xn)
    torch.testing.assert_close(cos(out["norm_corrected"], recon), torch.ones(len(x)))
    torch.testing.assert_close(out["cos_corrected"].norm(dim=-1), rn)
    torch.testing.assert_close(cos(out["cos_corrected"], x), torch.ones(len(x)))
    for t in ("eps_isotropic", "eps_cov_mixture", "eps_real_mixture"):
        torch.testing.assert_close((out[t] - x).norm(dim=-1), eps, rtol=1e-4, atol=1e-4)
    for t, norm in (("cos_preserving_sae_norm", rn), ("cos_preserving_true_norm", xn)):
        torch.testing.assert_close(out[t].norm(dim=-1), norm, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cos(out[t], x), cos(recon, x), rtol=1e-4, atol=1e-4)
        assert float(cos(out[t], recon).mean()) < 0.999  # a different vector at the same angle
    assert float(out["zero_ablation"].abs().max()) == 0.0
    torch.testing.assert_close(out["mean_ablation"], stats.mean.expand_as(x))
    torch.testing.assert_close(error_directions(sae, x, recon), unit(recon - x))


# ---------------------------------------------------------------------------- runners
@pytest.mark.parametrize("site", [
    "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre",
    "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post",
])
def test_all_positions_runner_equals_full_forward(llama3: Subject, site: str) -> None:
    ids = _ids(5, 12)
    runner = AllPositionsRunner(llama3, ids, site, batch_tokens=24)  # forces several chunks
    x = runner.clean_site.repeat(2, 1, 1) + 0.3 * torch.randn(10, *runner.clean_site.shape[1:])
    ctx = torch.arange(5).repeat(2)
    kl, l2 = runner.evaluate(x, ctx)
    ref_kl, ref_l2 = naive_forward_kl(llama3, ids[ctx], site, x, runner.clean_logp[ctx],
                                      runner.clean_last[ctx])
    assert float((kl - ref_kl).abs().max()) <= 1e-6
    assert float((l2 - ref_l2).abs().max()) <= 1e-5
    assert float(kl.mean()) > 1e-4  # the perturbation does something
    clean_kl, clean_l2 = runner.evaluate(runner.clean_site, torch.arange(5))
    assert float(clean_kl.abs().max()) <= 1e-6 and float(clean_l2.max()) <= 1e-5
    assert all("forward" not in b.__dict__ for b in llama3.layers)  # stubs removed


def test_skip_blocks_restores_on_error_and_handles_tuple_blocks() -> None:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                       attention_types=[[["global", "local"], 1]], window_size=8,
                       max_position_embeddings=64, intermediate_size=64)
    neo = Subject(GPTNeoForCausalLM(cfg).eval())
    ids = _ids(3, 10)
    runner = AllPositionsRunner(neo, ids, SITE)
    assert runner._tuple_len > 0  # GPT-Neo blocks return tuples
    x = runner.clean_site + 0.5
    kl, _ = runner.evaluate(x, torch.arange(3))
    ref, _ = naive_forward_kl(neo, ids, SITE, x, runner.clean_logp, runner.clean_last)
    assert float((kl - ref).abs().max()) <= 1e-6
    with pytest.raises(RuntimeError), skip_blocks(neo, 2):
        raise RuntimeError
    assert all("forward" not in b.__dict__ for b in neo.layers)


def test_last_position_runner_equals_full_forward(llama3: Subject) -> None:
    ids = _ids(6, 9)
    runner = LastPositionRunner(llama3, ids, SITE)
    delta = torch.randn(12, llama3.d_model)
    ctx = torch.arange(6).repeat(2)
    kl, l2 = runner.evaluate(delta, ctx)
    full = AllPositionsRunner(llama3, ids, SITE)
    new = (full.clean_site[ctx, -1] + delta)[:, None]
    ref_kl, ref_l2 = naive_forward_kl(llama3, ids[ctx], SITE, new, full.clean_logp[ctx],
                                      full.clean_last[ctx], positions=slice(-1, None))
    assert float((kl - ref_kl[:, -1]).abs().max()) <= 1e-5
    assert float((l2 - ref_l2[:, -1]).abs().max()) <= 1e-4
    assert float(ref_kl[:, :-1].abs().max()) <= 1e-6  # earlier positions never see the edit


def test_layer_ceiling(llama3: Subject) -> None:
    assert layer_ceiling(llama3, "blocks.0.hook_resid_post") == pytest.approx(1.5)
    assert layer_ceiling(llama3, "blocks.0.hook_resid_pre") == pytest.approx(1.0)


# ---------------------------------------------------------------------------- sweeps
@pytest.fixture(scope="module")
def tiny_result(llama3: Subject):
    saes = [tiny_sae(32, 64, "standard", seed=0), tiny_sae(32, 64, "topk", seed=1, k=2)]
    saes[1].name = "tiny-topk"
    cfg = SensitivityConfig(lengths=(0.1, 0.5), runs=2, positions=("all", "last"), n_boot=200)
    return run_sensitivity(llama3, _ids(6, 10, seed=1), _ids(8, 10, seed=2), SITE, saes, cfg)


def test_sweep_table_rows_and_columns(tiny_result) -> None:
    t = tiny_result.table
    cfg = tiny_result.config
    sweeps = t[t["panel"] != "substitution"]
    for positions in ("all", "last"):
        p = sweeps[sweeps["positions"] == positions]
        base = p[p["sae"] == ""]
        assert len(base) == len(BASE_FAMILIES) * cfg.runs * len(cfg.lengths)
        assert set(base["run"]) == {0, 1}
        err = p[p["family"] == "sae_error"]
        assert len(err) == 2 * len(cfg.lengths) and set(err["run"]) == {0}
        subs = t[(t["positions"] == positions) & (t["panel"] == "substitution")]
        assert set(subs["family"]) == set(SUBSTITUTIONS)
        assert subs["length"].isna().all()
    assert (t["kl_lo"] <= t["kl_mean"] + 1e-12).all() and (t["kl_mean"] <= t["kl_hi"] + 1e-12).all()
    assert (t["l2_lo"] <= t["l2_mean"] + 1e-9).all()
    np.testing.assert_allclose(sweeps["length_abs"], sweeps["length_rel"] * tiny_result.median_norm)
    np.testing.assert_allclose(sweeps["delta_norm"], sweeps["length_abs"])
    assert (t.loc[t["positions"] == "all", "n_tokens"] == 6 * 9).all()
    assert (t.loc[t["positions"] == "last", "n_tokens"] == 6).all()
    # KL grows with length for every (family, run) curve
    for _key, curve in sweeps.groupby(["positions", "family", "sae", "run"]):
        assert curve.sort_values("length")["kl_mean"].is_monotonic_increasing


def test_sweep_is_reproducible_and_units_agree(llama3: Subject) -> None:
    ids, stats_ids = _ids(4, 8, seed=3), _ids(8, 10, seed=4)
    cfg = SensitivityConfig(lengths=(0.2,), runs=1, families=("cov_mixture", "real_mixture"),
                            n_boot=50)
    a = run_sensitivity(llama3, ids, stats_ids, SITE, (), cfg)
    b = run_sensitivity(llama3, ids, stats_ids, SITE, (), cfg)
    pd.testing.assert_frame_equal(a.table, b.table)
    absolute = SensitivityConfig(**{**cfg.__dict__, "unit": "absolute",
                                    "lengths": (0.2 * a.median_norm,)})
    c = run_sensitivity(llama3, ids, stats_ids, SITE, (), absolute)
    np.testing.assert_allclose(c.table["kl_mean"], a.table["kl_mean"], rtol=1e-5)
    np.testing.assert_allclose(c.table["length"], c.table["length_abs"])


def test_sweep_bad_input(llama3: Subject) -> None:
    ids = _ids(3, 8)
    other = tiny_sae(32, 64, hook="blocks.1.hook_resid_post")
    with pytest.raises(SteerscopeError, match="not at the perturbed site"):
        run_sensitivity(llama3, ids, _ids(8, 10), SITE, [other])
    for cfg in (SensitivityConfig(lengths=(0.0,)), SensitivityConfig(lengths=(math.inf,)),
                SensitivityConfig(positions=("middle",)), SensitivityConfig(unit="furlong"),
                SensitivityConfig(runs=0), SensitivityConfig(families=("nope",))):
        with pytest.raises(SteerscopeError):
            run_sensitivity(llama3, ids, _ids(8, 10), SITE, (), cfg)
    with pytest.raises(SteerscopeError, match="at least 33"):
        run_sensitivity(llama3, ids, _ids(2, 8), SITE, ())


def test_findings_and_html(tiny_result) -> None:
    f = findings(tiny_result.table)
    assert f["positions"] == "all"
    t = tiny_result.table
    mean = t[(t.positions == "all") & (t.sae == "")].groupby(["family", "length_rel"])["kl_mean"]
    m = mean.mean()
    expected = (m["cov_mixture"] / m["isotropic"]).tolist()
    assert f["cov_mixture_over_isotropic"]["ratio"] == pytest.approx(expected)
    assert set(f["saes"]) == {"tiny-standard", "tiny-topk"}
    assert "substitution_over_eps_cov_mixture" in f["saes"]["tiny-topk"]
    page = render_html(t, tiny_result.meta(), f)
    assert page.count("data:image/png;base64,") == 8  # 4 figures × 2 position policies
    assert "substitution" in page and "cov_mixture" in page
