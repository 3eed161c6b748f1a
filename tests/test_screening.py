"""Screening on synthetic tables whose ground truth is known.

Every test builds predictors and labels where we decide which predictor drives which label, then
checks that the evaluation finds exactly that: the informative set beats the baselines, the CIs
cover the truth at the stated rate, residualisation removes a nuisance-driven label, the conformal
intervals reach their coverage, held-out screening separates clean from messy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata
from sklearn.model_selection import cross_val_predict

from steerscope.errors import SteerscopeError
from steerscope.screening import (
    check_compatible,
    clean_score,
    conformal_halfwidth,
    correlations,
    duan_sets,
    evaluate,
    headline,
    heldout_screening,
    measure_coverage,
    nuisance_columns,
    residualise,
    screen_features,
)
from steerscope.screening.evaluation import kfold, make_model, ridge_oof
from steerscope.screening.stats import dense_ranks, resample_ranks

GEOMETRY = ["decoder_norm", "encoder_norm", "encoder_decoder_cos", "crowding_max_abs_cos",
            "crowding_topk_mean_abs_cos", "crowding_topk_sum_abs_cos"]
OTHER = ["direct_logit_l2", "direct_logit_entropy", "coact_count_mean", "coact_entropy_norm",
         "token_act_kurtosis", "token_binary_entropy"]


def make_predictors(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Predictor columns named as steerscope.predictors names them (Duan's rules find the sets)."""
    p = pd.DataFrame({"feature": np.arange(n)})
    p["token_act_freq"] = rng.lognormal(-4, 1, n)
    p["final_act_freq"] = p["token_act_freq"] * rng.lognormal(0, 0.3, n)
    p["token_act_mean"] = rng.lognormal(-2, 1, n)
    p["token_act_max"] = p["token_act_mean"] * rng.lognormal(1, 0.3, n)
    p["token_act_std"] = rng.lognormal(-1, 0.5, n)
    p["token_act_q95"] = rng.lognormal(-1, 0.5, n)
    for c in GEOMETRY + OTHER:
        p[c] = rng.normal(size=n)
    return p


def make_labels(p: pd.DataFrame, rng: np.random.Generator, noise: float = 0.7) -> pd.DataFrame:
    """Stability falls with crowding; collateral rises with crowding and direct-logit L2; effect
    size follows the decoder norm. Frequency and activation magnitude drive nothing."""
    n = len(p)
    lab = pd.DataFrame({"feature": p["feature"].to_numpy()})
    lab["effect_l2"] = np.exp(0.3 * p["decoder_norm"].to_numpy() + 0.2 * rng.normal(size=n))
    lab["stability_abs"] = (0.5 - 0.1 * p["crowding_max_abs_cos"].to_numpy()
                            + 0.1 * noise * rng.normal(size=n))
    lab["collateral_count_0.05"] = np.exp(
        1 + 0.5 * p["crowding_max_abs_cos"].to_numpy() + 0.35 * p["direct_logit_l2"].to_numpy()
        + 0.5 * noise * rng.normal(size=n))
    lab["effect_cv"] = 0.3 + 0.05 * rng.normal(size=n)
    lab["noise_label"] = rng.normal(size=n)
    return lab


@pytest.fixture(scope="module")
def synth() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    p = make_predictors(400, rng)
    return p, make_labels(p, rng)


@pytest.fixture(scope="module")
def ev(synth: tuple[pd.DataFrame, pd.DataFrame]):  # noqa: ANN201 - an Evaluation
    p, lab = synth
    return evaluate(p, lab, targets=["stability_abs", "collateral_count_0.05", "effect_l2",
                                     "effect_cv", "noise_label"],
                    n_boot=200, gbm_labels=["collateral_count_0.05"])


# ------------------------------------------------------------------ building blocks
def test_resampled_ranks_equal_scipy_rankdata_with_ties() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))
    x[:, 1] = np.round(x[:, 1])  # heavy ties
    x[:120, 2] = 0.0  # a mass at zero, like the frequency of rare features
    dense = dense_ranks(x)
    for _ in range(5):
        idx = rng.integers(0, 300, 300)
        np.testing.assert_allclose(resample_ranks(dense, idx), rankdata(x[idx], axis=0))


def test_fast_ridge_equals_the_sklearn_pipeline() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 6)) * [1, 10, 0.1, 1, 1, 1]
    X[::5, 0] = np.nan  # imputed by the fold's median
    X[:, 3] = 4.0  # constant: StandardScaler leaves it at scale 1
    X[:, 4] = np.nan  # all-NaN: SimpleImputer drops it
    Y = X[:, [1, 2]] @ [[1.0, 0.3], [2.0, -1.0]] + rng.normal(size=(200, 2))
    folds = kfold(200, 5, 0)
    fast = ridge_oof(X, Y, folds)
    for k in range(2):
        ref = cross_val_predict(make_model("ridge"), X, Y[:, k], cv=folds)
        np.testing.assert_allclose(fast[:, k], ref, atol=1e-9)


def test_duan_sets_from_column_names(synth: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    sets = duan_sets([c for c in synth[0].columns if c != "feature"])
    assert set(sets["freq_only"]) == {"token_act_freq", "final_act_freq"}
    assert set(sets["activation_magnitude_only"]) == {"token_act_mean", "token_act_max",
                                                      "token_act_std", "token_act_q95"}
    assert set(sets["crowding"]) == set(GEOMETRY[3:])
    assert not set(sets["full_no_magnitude"]) & set(sets["activation_magnitude_only"])
    assert len(sets["full_all"]) == len(synth[0].columns) - 1


# ------------------------------------------------------------------ univariate
def test_univariate_finds_the_driving_predictor(ev) -> None:  # noqa: ANN001
    u = ev.univariate[~ev.univariate["residualised"]].set_index(["predictor", "label"])
    r = u.loc[("crowding_max_abs_cos", "stability_abs")]
    assert r["spearman"] < -0.6 and r["spearman_hi"] < -0.5 and r["q"] < 1e-6
    assert r["spearman_lo"] <= r["spearman"] <= r["spearman_hi"]
    assert abs(r["pearson"]) > 0.6
    # frequency drives nothing: its CI straddles zero for the stability label
    f = u.loc[("token_act_freq", "stability_abs")]
    assert f["spearman_lo"] < 0 < f["spearman_hi"]


def test_bootstrap_ci_covers_the_true_correlation_at_its_level() -> None:
    """Bivariate normal with ρ = 0.5: true Spearman is (6/π)·asin(ρ/2). Over 60 samples the 95 %
    percentile-bootstrap CI should cover it about 95 % of the time (binomial sd ≈ 3 %)."""
    rho = 0.5
    true_s = 6 / math.pi * math.asin(rho / 2)
    rng = np.random.default_rng(3)
    hits_s = hits_p = 0
    trials = 60
    for t in range(trials):
        z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=150)
        df = pd.DataFrame({"x": z[:, 0], "y": z[:, 1]})
        r = correlations(df, ["x"], ["y"], n_boot=200, seed=t).iloc[0]
        hits_s += r["spearman_lo"] <= true_s <= r["spearman_hi"]
        hits_p += r["pearson_lo"] <= rho <= r["pearson_hi"]
    assert 0.85 <= hits_s / trials <= 1.0
    assert 0.85 <= hits_p / trials <= 1.0


def test_correlations_use_pairwise_finite_rows() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=100)
    df = pd.DataFrame({"a": x, "b": x.copy(), "y": x + 0.1 * rng.normal(size=100)})
    df.loc[:29, "b"] = np.nan
    out = correlations(df, ["a", "b"], ["y"], n_boot=50).set_index("predictor")
    assert out.loc["a", "n"] == 100 and out.loc["b", "n"] == 70
    assert out.loc["b", "spearman"] > 0.9


# ------------------------------------------------------------------ cross-validation
def test_cv_signal_set_beats_both_baselines(ev) -> None:  # noqa: ANN001
    cv = ev.cv[~ev.cv["residualised"] & (ev.cv["model"] == "ridge")].set_index(["label", "set"])
    full = cv.loc[("collateral_count_0.05", "full_no_magnitude")]
    assert full["cv_spearman"] > 0.7
    for base in ("freq_only", "activation_magnitude_only"):
        assert abs(cv.loc[("collateral_count_0.05", base), "cv_spearman"]) < 0.15
        assert full[f"gain_vs_{base}_lo"] > 0.5
        assert full[f"gain_vs_{base}_lo"] <= full[f"gain_vs_{base}"] <= full[f"gain_vs_{base}_hi"]
    assert full["r2"] > 0.4 and full["mae"] > 0
    # crowding alone misses the direct-logit half of the signal; the full set gets both
    assert cv.loc[("collateral_count_0.05", "crowding"), "cv_spearman"] < full["cv_spearman"]
    gbm = ev.cv[(ev.cv["model"] == "gbm") & ~ev.cv["residualised"]].set_index(["label", "set"])
    assert gbm.loc[("collateral_count_0.05", "full_no_magnitude"), "cv_spearman"] > 0.6


def test_cv_on_a_pure_noise_label_finds_nothing(ev) -> None:  # noqa: ANN001
    cv = ev.cv[~ev.cv["residualised"] & (ev.cv["model"] == "ridge")].set_index(["label", "set"])
    row = cv.loc[("noise_label", "full_no_magnitude")]
    assert abs(row["cv_spearman"]) < 0.15
    assert row["gain_vs_freq_only_lo"] < 0 < row["gain_vs_freq_only_hi"]


def test_verdicts_follow_duans_heuristic(ev) -> None:  # noqa: ANN001
    v = ev.verdicts.set_index("label")
    assert v.loc["stability_abs", "verdict"] == "robust"
    assert v.loc["stability_abs", "best_predictor"] == "crowding_max_abs_cos"
    assert v.loc["collateral_count_0.05", "verdict"] == "robust"
    assert v.loc["noise_label", "verdict"] == "none"
    assert v.loc["effect_cv", "verdict"] == "none"
    assert bool(v.loc["collateral_count_0.05", "gain_ci_positive"])


def test_evaluation_json_is_strict_json(ev) -> None:  # noqa: ANN001
    doc = ev.to_json()
    text = json.dumps(doc, allow_nan=False)
    assert {"univariate", "cv", "verdicts"} <= set(json.loads(text))


# ------------------------------------------------------------------ residualisation
def test_residualisation_removes_a_nuisance_driven_label() -> None:
    """A label that is effect size (or log-frequency) plus noise correlates with the decoder norm
    (or the frequency predictors) only through the nuisance; after residualisation no predictor
    explains it, while a label with its own signal keeps it. On ranks (the default) the
    monotone-but-not-linear frequency effect goes too; Duan's linear version leaves it."""
    rng = np.random.default_rng(5)
    p = make_predictors(400, rng)
    lab = make_labels(p, rng)
    lab["effect_driven"] = 2.0 * lab["effect_l2"] + 0.05 * rng.normal(size=400)
    lab["freq_driven"] = np.log(p["token_act_freq"]) + 0.1 * rng.normal(size=400)
    data = lab.merge(p, on="feature")
    sets = duan_sets([c for c in p.columns if c != "feature"])
    nuis = nuisance_columns(data, sets)
    assert "effect_l2" in nuis and "token_act_freq" in nuis  # frequency IS in the nuisance set
    preds = [c for c in p.columns if c != "feature" and c not in nuis]
    raw = correlations(data, preds, ["effect_driven"], n_boot=50).set_index("predictor")
    assert raw.loc["decoder_norm", "spearman"] > 0.6
    targets = ["effect_driven", "freq_driven", "stability_abs"]
    res = residualise(data, targets, nuis)
    rx = residualise(data, preds, nuis)
    after = correlations(pd.concat([rx, res], axis=1), preds, targets, n_boot=50)
    after = after.set_index(["predictor", "label"])
    for lab_name in ("effect_driven", "freq_driven"):
        assert after.xs(lab_name, level="label")["pearson"].abs().max() < 0.2
    assert after.loc[("crowding_max_abs_cos", "stability_abs"), "pearson"] < -0.6
    # the linear (raw-value) version cannot remove a log-shaped frequency effect
    lin = residualise(data, ["freq_driven"], nuis, method="linear")["freq_driven"]
    assert abs(pd.Series(lin).corr(data["token_act_freq"], method="spearman")) > 0.3


def test_residualised_rho_is_a_partial_spearman(ev) -> None:  # noqa: ANN001
    u = ev.univariate[ev.univariate["residualised"]]
    assert not set(u["predictor"]) & set(ev.nuisance)  # a nuisance predictor has no partial ρ
    r = u.set_index(["predictor", "label"]).loc[("crowding_max_abs_cos", "stability_abs")]
    assert r["spearman"] == r["pearson"] and r["spearman"] < -0.6
    assert ev.settings["residualisation"] == "rank"


def test_residualised_cv_is_reported_for_every_label(ev) -> None:  # noqa: ANN001
    r = ev.cv[ev.cv["residualised"]]
    assert {"stability_abs", "collateral_count_0.05", "noise_label"} <= set(r["label"])
    assert "effect_l2" not in set(r["label"])  # a nuisance label is not residualised
    v = ev.verdicts.set_index("label")
    assert v.loc["stability_abs", "resid_full_cv_spearman"] > 0.5


# ------------------------------------------------------------------ conformal screen
def test_conformal_halfwidth_is_the_right_order_statistic() -> None:
    r = np.arange(1.0, 10.0)  # 9 residuals
    assert conformal_halfwidth(r, 0.2) == 8.0  # ceil(10 · 0.8) = 8th smallest
    assert conformal_halfwidth(-r, 0.2) == 8.0  # absolute values
    assert conformal_halfwidth(r[:3], 0.1) == math.inf  # too few points for 90 %


def test_conformal_intervals_reach_their_coverage_on_new_features() -> None:
    """Fit on 500 labelled features, check the 80 % intervals on 3000 unseen ones."""
    rng = np.random.default_rng(6)
    p = make_predictors(3500, rng)
    lab = make_labels(p, rng)
    truth = pd.Series(clean_score(lab), index=lab["feature"])  # z over the whole population
    labelled = lab.iloc[:500]
    sc = screen_features(p, labelled, alpha=0.2, coverage_repeats=20, seed=0)
    t = sc.table.set_index("feature").loc[lab["feature"].iloc[500:]]
    # the screen z-scores within the labelled sample; map the truth onto that scale
    sub = lab.iloc[:500]
    z_stab = (lab["stability_abs"] - sub["stability_abs"].mean()) / (
        sub["stability_abs"].std(ddof=0) + 1e-8)
    cpe = np.log1p(lab["collateral_count_0.05"]) / (lab["effect_l2"].abs() + 1e-8)
    z_c = (cpe - cpe.iloc[:500].mean()) / (cpe.iloc[:500].std(ddof=0) + 1e-8)
    y_new = (z_stab - z_c).iloc[500:].to_numpy()
    cov = np.mean((y_new >= t["pred_lo"].to_numpy()) & (y_new <= t["pred_hi"].to_numpy()))
    assert 0.75 <= cov <= 0.9, cov
    assert 0.72 <= sc.summary["coverage"]["measured"] <= 0.9
    assert sc.summary["coverage"]["nominal"] == pytest.approx(0.8)
    assert truth.notna().all()


def test_measure_coverage_on_pure_noise_still_holds() -> None:
    """The guarantee needs no signal: with useless predictors intervals are wide, not wrong."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(300, 5))
    y = rng.standard_t(3, size=300)
    c = measure_coverage(X, y, alpha=0.1, repeats=30, seed=0)
    assert 0.85 <= c["measured"] <= 0.95


def test_screen_ranks_every_feature_with_consistent_tiers(
    synth: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    p, lab = synth
    rng = np.random.default_rng(8)
    extra = make_predictors(300, rng)
    extra["feature"] += len(p)
    allp = pd.concat([p, extra], ignore_index=True)
    domain = np.ones(len(allp), bool)
    domain[-50:] = False
    sc = screen_features(allp, lab, domain=domain, coverage_repeats=5)
    t = sc.table
    assert len(t) == len(allp) and t["rank"].tolist() == list(range(1, len(allp) + 1))
    assert t["pred_clean_score"].is_monotonic_decreasing
    assert (t["pred_lo"] <= t["pred_clean_score"]).all()
    m = sc.summary["median_clean_score"]
    inside = t[t["in_domain"]]
    assert (inside.loc[inside["tier"] == "clean", "pred_lo"] > m).all()
    assert (inside.loc[inside["tier"] == "messy", "pred_hi"] < m).all()
    assert (t.loc[~t["in_domain"], "tier"] == "uncertain").all()
    assert {"clean", "messy"} <= set(t["tier"])  # a strong signal gives confident tiers
    assert t["labelled"].sum() == len(lab)
    assert t.loc[t["labelled"], "measured_stability_abs"].notna().all()
    assert t.loc[~t["labelled"], "measured_stability_abs"].isna().all()
    # the cleanest predicted labelled features really are cleaner than the messiest
    lab_t = t[t["labelled"]]
    assert lab_t.head(50)["measured_clean_score"].mean() > lab_t.tail(50)[
        "measured_clean_score"].mean() + 1.0


# ------------------------------------------------------------------ held-out screening
def _fresh_measure(p: pd.DataFrame, seed: int):  # noqa: ANN202 - a Measure
    """Labels on 'new contexts': the same ground truth, fresh noise."""
    def measure(features):  # noqa: ANN001, ANN202
        sub = p.set_index("feature").loc[list(features)].reset_index()
        return make_labels(sub, np.random.default_rng(seed))
    return measure


def test_heldout_separates_clean_from_messy_on_new_contexts(
    synth: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    p, lab = synth
    calls: list[list[int]] = []
    measure = _fresh_measure(p, 11)

    def spy(features):  # noqa: ANN001, ANN202
        calls.append(list(features))
        return measure(features)

    ho = heldout_screening(p, lab, spy, n_boot=100)
    s = ho.summary
    assert s["contexts"] == "new" and len(calls) == 1
    assert s["n_train"] == 240 and s["n_pool"] == 160
    n = s["n_per_group"]
    assert n == min(50, s["n_candidates"] // 3) and len(calls[0]) == 3 * n
    trained = set(lab["feature"]) - set(ho.features["feature"])
    assert len(trained) >= 240  # groups come from the pool only
    assert s["outcome"] == "strong" and s["significant_stability"] and s["significant_collateral"]
    assert s["pool_spearman"] > 0.5
    t = ho.tests.set_index(["metric", "group_a", "group_b"])
    assert t.loc[("stability_abs", "predicted_clean", "predicted_messy"), "p"] < 1e-4
    # effect matching: the groups' measured effect sizes are within a factor 1.5
    eff = ho.features.groupby("group")["effect_l2"].mean()
    assert eff.max() / eff.min() < 1.5


def test_heldout_with_useless_predictors_is_not_significant() -> None:
    rng = np.random.default_rng(9)
    p = make_predictors(400, rng)
    lab = make_labels(p, rng)
    shuffled = p.copy()
    cols = [c for c in p.columns if c != "feature"]
    shuffled[cols] = p[cols].sample(frac=1.0, random_state=1).to_numpy()
    ho = heldout_screening(shuffled, lab, None, predictor_set="full_no_magnitude", n_boot=50)
    assert ho.summary["contexts"] == "original"
    assert not (ho.summary["significant_stability"] and ho.summary["significant_collateral"])
    assert abs(ho.summary["pool_spearman"]) < 0.25


def test_heldout_scales_groups_down_and_skips_tiny_pools() -> None:
    rng = np.random.default_rng(10)
    p = make_predictors(80, rng)
    ho = heldout_screening(p, make_labels(p, rng), None, n_boot=20)
    assert ho.summary["n_per_group"] == ho.summary["n_candidates"] // 3 < 50
    assert ho.outcome in ("strong", "partial", "weak")
    tiny = heldout_screening(p.iloc[:30], make_labels(p.iloc[:30], rng), None, n_boot=20)
    assert tiny.outcome == "skipped" and "label at least" in tiny.summary["skipped"]


# ------------------------------------------------------------------ headline
def test_headline_reports_best_predictor_gains_and_outcome(ev, synth) -> None:  # noqa: ANN001
    p, lab = synth
    doc = ev.to_json()
    doc["heldout"] = heldout_screening(p, lab, None, n_boot=20).to_json()
    doc["screen"] = screen_features(p, lab, cv=ev.cv, coverage_repeats=3).to_json()
    h = headline(json.loads(json.dumps(doc)))
    assert h["best"]["label"] in ("stability_abs", "collateral_count_0.05")
    assert abs(h["best"]["rho"]) > 0.6 and h["best"]["rho_lo"] <= h["best"]["rho"]
    assert h["full_beats_freq"]["labels"] >= 2
    assert h["heldout"]["outcome"] == "strong"
    assert h["screen"]["coverage"] is not None
    assert h["verdict_counts"]["robust"] >= 2


# ------------------------------------------------------------------ bad input
def test_too_few_labelled_features_says_how_many_are_needed(synth) -> None:  # noqa: ANN001
    p, lab = synth
    with pytest.raises(SteerscopeError, match=r"only 30 .*needs at least 40"):
        evaluate(p, lab.iloc[:30], n_boot=10)
    with pytest.raises(SteerscopeError, match="at least 40"):
        screen_features(p, lab.iloc[:30])


def test_constant_labels_are_refused(synth) -> None:  # noqa: ANN001
    p, lab = synth
    const = lab.assign(stability_abs=0.5)
    with pytest.raises(SteerscopeError, match="'stability_abs' is constant"):
        evaluate(p, const, targets=["stability_abs"], n_boot=10)
    all_const = lab[["feature"]].assign(stability_abs=0.5, effect_l2=1.0)
    with pytest.raises(SteerscopeError, match="no label varies"):
        evaluate(p, all_const, n_boot=10)
    # a constant default label is skipped, not fatal
    some = lab.assign(**{"collateral_count_0.1": 0.0})
    some = some.rename(columns={"noise_label": "kl"})
    e = evaluate(p, some, n_boot=10, models=("ridge",), residualise_labels=False)
    assert "kl" in e.targets and "collateral_count_0.1" not in e.targets


def test_tables_from_different_saes_are_refused(synth) -> None:  # noqa: ANN001
    p, lab = synth
    with pytest.raises(SteerscopeError, match="different SAEs"):
        check_compatible({"model": "m", "sae": "relu-blocks.0"},
                         {"model": "m", "sae": "topk-blocks.0"})
    with pytest.raises(SteerscopeError, match="different models"):
        check_compatible({"model": "a", "sae": "s"}, {"model": "b", "sae": "s"})
    check_compatible({"model": "a", "sae": "s"}, {"model": "a", "sae": "s"})
    stray = lab.assign(feature=lab["feature"] + 10_000)
    with pytest.raises(SteerscopeError, match="have no predictors"):
        evaluate(p, stray, n_boot=10)


def test_missing_baseline_columns_are_refused(synth) -> None:  # noqa: ANN001
    p, lab = synth
    no_freq = p.drop(columns=["token_act_freq", "final_act_freq"])
    with pytest.raises(SteerscopeError, match="freq_only"):
        evaluate(no_freq, lab, n_boot=10)


def test_manifests_match_across_spellings_of_the_same_sae(tmp_path) -> None:  # noqa: ANN001
    d = tmp_path / "relu-blocks.0.hook_resid_post"
    d.mkdir()
    check_compatible({"model": "m", "sae": "relu-blocks.0.hook_resid_post"},
                     {"model": "m", "sae": str(d)})
    check_compatible({"model": "m", "sae": "gemma-scope-2b-pt-res/layer_12/width_16k/canonical"},
                     {"model": "m", "sae": "gemma-scope-2b-pt-res:layer_12/width_16k/canonical"})
    with pytest.raises(SteerscopeError, match="different SAEs"):
        check_compatible({"model": "m", "sae": "rel/layer_12/width_16k/canonical"},
                         {"model": "m", "sae": "rel:layer_16/width_16k/canonical"})


def test_a_constant_clean_score_is_refused_by_the_screen(synth) -> None:  # noqa: ANN001
    p, lab = synth
    flat = lab.assign(stability_abs=0.5, **{"collateral_count_0.05": 3.0}, effect_l2=1.0)
    with pytest.raises(SteerscopeError, match="clean score is constant"):
        screen_features(p, flat)
    with pytest.raises(SteerscopeError, match="clean score is constant"):
        heldout_screening(p, flat, None)
    e = evaluate(p, flat, n_boot=10, models=("ridge",), residualise_labels=False)
    assert "clean_score" in e.skipped_labels and e.targets == ["effect_cv"]
