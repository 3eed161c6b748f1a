"""Screen EVERY feature of an SAE: predicted clean score with a calibrated interval, and a tier.

Labelling (steering) costs forwards per feature; predictors cost one pass over the corpus for all
features. So a user labels a sample, fits the screen on it, and gets a prediction for all 16K–131K
features. A point prediction alone would be over-trusted, so each comes with a split-conformal
interval:

* the labelled features are shuffled (seed) into a fitting part and a calibration part (25 %);
* the model is fitted on the fitting part; the calibration residuals ``|y − ŷ|`` give the
  half-width ``q`` = their ⌈(n_cal + 1)(1 − α)⌉-th smallest value;
* every feature gets ``[ŷ − q, ŷ + q]``, which covers its true clean score with probability at
  least ``1 − α`` for features exchangeable with the labelled ones (the guarantee is marginal:
  on average over features, not for each one).

The coverage is not just asserted: :func:`measure_coverage` repeats the whole procedure on random
train/test splits of the labelled features and reports how often the test features' true clean
scores fell inside their intervals.

Tiers read the interval against the labelled features' median clean score ``m``: **clean** when
the whole interval lies above ``m`` (confidently cleaner than a typical feature), **messy** when it
lies below, **uncertain** otherwise — and always uncertain outside the labelling domain (e.g. dead
features, never sampled for labelling, where exchangeability and so the guarantee do not hold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from steerscope.errors import SteerscopeError
from steerscope.screening.data import (
    CLEAN_SCORE,
    COLLATERAL,
    COLLATERAL_PER_EFFECT,
    EFFECT,
    STABILITY,
    Progress,
    check_enough,
    check_tables,
    clean_score,
    merge,
    resolve_sets,
)
from steerscope.screening.evaluation import make_model, oof_predictions
from steerscope.screening.heldout import per_effect
from steerscope.screening.stats import jsonable, single_blas

PREDICTED = (STABILITY, COLLATERAL_PER_EFFECT, EFFECT)
"""Labels also predicted for every feature (same set and model, fitted on all labelled features,
no interval): what the feature cards compare with the measured values."""

MEASURED = (STABILITY, "stability_signed", EFFECT, "effect_cv", COLLATERAL,
            COLLATERAL_PER_EFFECT, "downstream_l2", "kl", "kl_per_effect")
"""Measured labels copied into ``screen.parquet`` for the labelled features."""


@dataclass
class Screen:
    """The ranked table of all features and how it was made (set, model, interval, coverage)."""

    table: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return jsonable(self.summary)


def conformal_halfwidth(residuals: np.ndarray, alpha: float) -> float:
    """The split-conformal half-width: the ⌈(n+1)(1−α)⌉-th smallest absolute residual.

    Infinite when there are too few calibration points for that level (then no finite interval
    has the guarantee).
    """
    r = np.sort(np.abs(np.asarray(residuals, dtype=float)))
    n = r.size
    k = math.ceil((n + 1) * (1 - alpha))
    if n == 0 or k > n:
        return float("inf")
    return float(r[k - 1])


def _split(n: int, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    k = max(1, int(round(frac * n)))
    return perm[k:], perm[:k]


def fit_conformal(
    X: np.ndarray, y: np.ndarray, *, model: str = "ridge", alpha: float = 0.2,
    cal_frac: float = 0.25, seed: int = 0,
) -> tuple[Any, float]:
    """Fit on the fitting part, calibrate on the rest: ``(fitted model, half-width)``."""
    fit_idx, cal_idx = _split(len(y), cal_frac, np.random.default_rng(seed))
    m = make_model(model, seed).fit(X[fit_idx], y[fit_idx])
    q = conformal_halfwidth(y[cal_idx] - m.predict(X[cal_idx]), alpha)
    return m, q


@single_blas
def measure_coverage(
    X: np.ndarray, y: np.ndarray, *, model: str = "ridge", alpha: float = 0.2,
    cal_frac: float = 0.25, test_frac: float = 0.2, repeats: int = 20, seed: int = 0,
) -> dict[str, Any]:
    """Empirical coverage of the procedure: ``repeats`` random test splits of the labelled data;
    each time split-conformal is run on the rest and scored on the test part."""
    rng = np.random.default_rng(seed + 1)
    covs, widths = [], []
    for r in range(repeats):
        rest, test = _split(len(y), test_frac, rng)
        m, q = fit_conformal(X[rest], y[rest], model=model, alpha=alpha, cal_frac=cal_frac,
                             seed=seed + 1 + r)
        covs.append(float(np.mean(np.abs(y[test] - m.predict(X[test])) <= q)))
        widths.append(2 * q)
    c = np.asarray(covs)
    return {"nominal": 1 - alpha, "measured": float(c.mean()), "std": float(c.std()),
            "min": float(c.min()), "max": float(c.max()), "repeats": repeats,
            "test_frac": test_frac, "median_width": float(np.median(widths))}


def choose_model(
    cv: pd.DataFrame | None, sets: Mapping[str, Sequence[str]], data: pd.DataFrame,
    *, seed: int = 0, n_splits: int = 5,
) -> tuple[str, str, float]:
    """The (set, model) with the best CV Spearman on the clean score: from the evaluation's
    table when given, else from a ridge CV over the sets here. Model selection on ~10 options
    barely inflates that Spearman, and does not touch the conformal guarantee (the calibration
    features are not used to fit)."""
    if cv is not None and len(cv):
        c = cv[(cv["label"] == CLEAN_SCORE)]
        if "residualised" in c.columns:
            c = c[~c["residualised"].astype(bool)]
        c = c[c["set"].isin(list(sets))].dropna(subset=["cv_spearman"])
        if len(c):
            best = c.loc[c["cv_spearman"].idxmax()]
            return str(best["set"]), str(best["model"]), float(best["cv_spearman"])
    y = data[CLEAN_SCORE].to_numpy(float)
    best_name, best_rho = next(iter(sets)), -np.inf
    for name, cols in sets.items():
        pred = oof_predictions(data[list(cols)].to_numpy(float), y, "ridge", n_splits=n_splits,
                               seed=seed)
        rho = pd.Series(y).corr(pd.Series(pred), method="spearman")
        if np.isfinite(rho) and rho > best_rho:
            best_name, best_rho = name, float(rho)
    return best_name, "ridge", best_rho


@single_blas
def screen_features(
    predictors: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    sets: Mapping[str, Sequence[str]] | None = None,
    predictor_set: str | None = None,
    model: str | None = None,
    cv: pd.DataFrame | None = None,
    alpha: float = 0.2,
    cal_frac: float = 0.25,
    coverage_repeats: int = 20,
    domain: pd.Series | np.ndarray | None = None,
    seed: int = 0,
    n_splits: int = 5,
    predict_labels: Sequence[str] = PREDICTED,
    progress: Progress | None = None,
) -> Screen:
    """Predict the clean score of every feature in ``predictors`` with a conformal interval.

    ``predictor_set`` / ``model`` default to the best by CV on the clean score (``cv``: the
    evaluation's table, reused). ``predict_labels`` are predicted too (``pred_<label>``, no
    interval). ``domain``: a boolean per row of ``predictors`` — False marks
    features outside the population the labelled ones were sampled from (always "uncertain").
    Returns the table ranked by predicted clean score (rank 1 = cleanest).
    """
    if not 0 < alpha < 1:
        raise SteerscopeError(f"alpha {alpha} is not in (0, 1)", "use e.g. 0.2 for 80 % intervals")
    check_tables(predictors, labels)
    sets_r = resolve_sets(predictors, sets)
    data = merge(predictors, labels)
    data[CLEAN_SCORE] = clean_score(data)
    data = data[np.isfinite(data[CLEAN_SCORE])].reset_index(drop=True)
    check_enough(len(data), n_splits, "labelled features with a finite clean score")
    if progress is not None:
        progress("screening all features: choosing the model", 0.0)
    if predictor_set is None or model is None:
        s_best, m_best, rho = choose_model(cv, sets_r, data, seed=seed, n_splits=n_splits)
        predictor_set = predictor_set or s_best
        model = model or m_best
    else:
        rho = float("nan")
    if predictor_set not in sets_r:
        raise SteerscopeError(f"unknown predictor set '{predictor_set}'",
                              f"choose one of {', '.join(sets_r)}")
    cols = list(sets_r[predictor_set])
    X = data[cols].to_numpy(float)
    y = data[CLEAN_SCORE].to_numpy(float)
    if progress is not None:
        progress("screening all features: measuring interval coverage", 0.2)
    coverage = measure_coverage(X, y, model=model, alpha=alpha, cal_frac=cal_frac,
                                repeats=coverage_repeats, seed=seed)
    fitted, q = fit_conformal(X, y, model=model, alpha=alpha, cal_frac=cal_frac, seed=seed)
    if progress is not None:
        progress("screening all features: predicting", 0.9)
    pred = fitted.predict(predictors[cols].to_numpy(float))
    median = float(np.median(y))
    in_dom = np.ones(len(predictors), bool) if domain is None else np.asarray(domain, bool)
    if in_dom.shape != (len(predictors),):
        raise SteerscopeError("the domain mask has the wrong length",
                              "pass one boolean per row of the predictors table")
    lo, hi = pred - q, pred + q
    tier = np.where(lo > median, "clean", np.where(hi < median, "messy", "uncertain"))
    tier = np.where(in_dom, tier, "uncertain")
    table = pd.DataFrame({
        "feature": predictors["feature"].to_numpy(),
        "pred_clean_score": pred, "pred_lo": lo, "pred_hi": hi, "tier": tier,
        "in_domain": in_dom,
    })
    measured = per_effect(labels)
    full = per_effect(data)
    for lab in predict_labels:
        if lab not in full.columns:
            continue
        yl = full[lab].to_numpy(float)
        ok = np.isfinite(yl)
        if ok.sum() >= n_splits and np.nanstd(yl) > 0:
            m_l = make_model(model, seed).fit(X[ok], yl[ok])
            table[f"pred_{lab}"] = m_l.predict(predictors[cols].to_numpy(float))
    measured[CLEAN_SCORE] = measured["feature"].map(
        dict(zip(data["feature"], data[CLEAN_SCORE], strict=True)))
    keep = ["feature", CLEAN_SCORE, *[c for c in MEASURED if c in measured.columns]]
    measured = measured[keep].rename(columns={c: f"measured_{c}" for c in keep if c != "feature"})
    table = table.merge(measured, on="feature", how="left")
    table["labelled"] = table["feature"].isin(set(labels["feature"]))
    table = table.sort_values("pred_clean_score", ascending=False, kind="stable")
    table.insert(1, "rank", np.arange(1, len(table) + 1))
    table = table.reset_index(drop=True)
    covered = (table["labelled"] & (table["measured_clean_score"] >= table["pred_lo"])
               & (table["measured_clean_score"] <= table["pred_hi"]))
    summary = {
        "predictor_set": predictor_set, "predictors": cols, "model": model,
        "cv_spearman": rho, "alpha": alpha, "level": 1 - alpha, "halfwidth": q,
        "cal_frac": cal_frac, "n_labelled": int(len(y)), "median_clean_score": median,
        "coverage": coverage,
        # In-sample (fitting + calibration features): optimistic, shown only for contrast.
        "coverage_labelled_in_sample": float(covered.sum() / max(1, table["labelled"].sum())),
        "tiers": {t: int((table["tier"] == t).sum()) for t in ("clean", "uncertain", "messy")},
        "n_features": int(len(table)), "n_in_domain": int(in_dom.sum()),
    }
    if progress is not None:
        progress("screening all features done", 1.0)
    return Screen(table, summary)
