"""Held-out screening (Duan §2.7): does picking features by *predicted* cleanliness pay off?

Correlations on the labelled sample can look good and still not help a user choose features. The
test that matters: train the screen on some features, let it pick "clean" and "messy" features it
has never seen, steer them on contexts it has never seen, and compare.

1. Split the labelled features 60/40 (seed 0) into a training set and a candidate pool.
2. Fit ridge on standardised predictors (Duan's ``geometry`` set by default) to the clean score
   ``z(S_abs) − z(log1p(C_0.05) / (|E| + 1e-8))``; predict it for the pool.
3. Effect matching: a second ridge predicts the effect size E; only pool features whose predicted
   E lies between its 10th and 90th percentiles stay candidates, so "clean" cannot just mean
   "does nothing".
4. Groups: top / bottom ``n`` by predicted clean score and ``n`` random others (``n`` = 50, scaled
   down to a third of the candidates for small pools).
5. Measure their labels on NEW contexts (the held-out corpus split) through ``measure``.
6. Mann–Whitney U tests clean vs messy, clean vs random, messy vs random on every label.
7. Success: clean is more stable than messy (S_abs) and has less collateral per unit of effect
   (C_0.05 / E).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu, spearmanr
from sklearn.model_selection import train_test_split

from steerscope.errors import SteerscopeError
from steerscope.screening.data import (
    CLEAN_SCORE,
    COLLATERAL,
    COLLATERAL_PER_EFFECT,
    EFFECT,
    STABILITY,
    Progress,
    clean_score,
    merge,
    resolve_sets,
)
from steerscope.screening.evaluation import make_model
from steerscope.screening.stats import boot_idx, jsonable, percentile_ci, records, single_blas

Measure = Callable[[Sequence[int]], pd.DataFrame]
"""``measure(features) -> labels``: labels of those features on NEW contexts, one row per
feature with at least ``feature``, ``effect_l2``, ``stability_abs``, ``collateral_count_0.05``."""

DUAN_GEOMETRY = ("decoder_norm", "encoder_decoder_cos", "encoder_norm", "crowding_max",
                 "crowding_topk_mean")
"""§2.7 step 2; crowding_topk_sum is left out (linearly redundant with the mean at fixed k)."""

GROUPS = ("predicted_clean", "predicted_messy", "random_control")

GROUP_METRICS = (
    "stability_abs", "stability_signed", "effect_l2", "effect_cv", "kl", "kl_per_effect",
    "downstream_l2", "downstream_l2_per_effect", "effective_moved", "collateral_count_0.05",
    "collateral_per_effect",
)
"""What the groups are compared on (the Phase 4 script's summary metrics, where present)."""


@dataclass
class HeldoutResult:
    """Selected features with their measured labels, the group tests, and the outcome."""

    features: pd.DataFrame
    tests: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        return str(self.summary.get("outcome", "skipped"))

    def to_json(self) -> dict[str, Any]:
        return {"summary": jsonable(self.summary), "tests": records(self.tests),
                "features": records(self.features)}


def geometry_columns(sets: Mapping[str, Sequence[str]]) -> list[str]:
    """Duan's five geometry predictors if present, else the whole ``geometry`` set."""
    geo = list(sets.get("geometry", ()))
    pick = [c for c in geo if any(c == d or c.startswith(d) for d in DUAN_GEOMETRY)
            and "sum" not in c]
    return pick or geo


def per_effect(labels: pd.DataFrame) -> pd.DataFrame:
    """Add the per-unit-of-effect labels the groups are compared on (Phase 4 definitions)."""
    out = labels.copy()
    if EFFECT not in out.columns:
        return out
    e = out[EFFECT].to_numpy(dtype=float) + 1e-8
    if COLLATERAL_PER_EFFECT not in out.columns and COLLATERAL in out.columns:
        out[COLLATERAL_PER_EFFECT] = out[COLLATERAL].to_numpy(dtype=float) / e
    if "downstream_l2_per_effect" not in out.columns and "downstream_l2" in out.columns:
        out["downstream_l2_per_effect"] = out["downstream_l2"].to_numpy(dtype=float) / e
    if "kl_per_effect" not in out.columns and "kl" in out.columns:
        out["kl_per_effect"] = out["kl"].to_numpy(dtype=float) / e
    return out


@single_blas
def select_groups(
    data: pd.DataFrame,
    predictor_cols: Sequence[str],
    *,
    train_frac: float = 0.6,
    n_per_group: int = 50,
    seed: int = 0,
    effect_band: tuple[float, float] | None = (0.1, 0.9),
    min_per_group: int = 5,
    n_boot: int = 1000,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Steps 1–4: the three groups (rows of ``data`` with a ``group`` column) and what was done.

    ``data`` holds labelled features with their predictors. Returns an empty frame and a
    ``skipped`` reason when the pool is too small for ``min_per_group`` per group.
    """
    cols = list(predictor_cols)
    if not cols:
        raise SteerscopeError("no predictor columns for held-out screening",
                              "pass a predictor set that exists in predictors.parquet")
    df = data.copy()
    df[CLEAN_SCORE] = clean_score(df)
    df = df[np.isfinite(df[CLEAN_SCORE]) & np.isfinite(df[EFFECT].astype(float))]
    info: dict[str, Any] = {"predictors": cols, "train_frac": train_frac, "seed": seed,
                            "n_labelled": int(len(df))}
    if len(df) < 10:
        info["skipped"] = f"only {len(df)} labelled features with a finite clean score"
        return df.iloc[:0].assign(group=pd.Series(dtype=str)), info
    train, pool = train_test_split(df, test_size=1.0 - train_frac, random_state=seed)
    clean_model = make_model("ridge").fit(train[cols].to_numpy(float),
                                          train[CLEAN_SCORE].to_numpy(float))
    effect_model = make_model("ridge").fit(train[cols].to_numpy(float),
                                           train[EFFECT].to_numpy(float))
    pool = pool.copy()
    pool["pred_clean_score"] = clean_model.predict(pool[cols].to_numpy(float))
    pool["pred_effect_l2"] = effect_model.predict(pool[cols].to_numpy(float))
    rho, lo, hi = _spearman_ci(pool[CLEAN_SCORE].to_numpy(float),
                               pool["pred_clean_score"].to_numpy(float), n_boot, seed)
    info.update(n_train=int(len(train)), n_pool=int(len(pool)), pool_spearman=rho,
                pool_spearman_lo=lo, pool_spearman_hi=hi)
    cand = pool
    if effect_band is not None:
        e_lo, e_hi = np.quantile(pool["pred_effect_l2"], effect_band)
        cand = pool[(pool["pred_effect_l2"] >= e_lo) & (pool["pred_effect_l2"] <= e_hi)]
        info["effect_band"] = [float(e_lo), float(e_hi)]
    n = min(n_per_group, len(cand) // 3)
    info.update(n_candidates=int(len(cand)), n_per_group=int(n),
                n_per_group_requested=int(n_per_group))
    if n < min_per_group:
        info["skipped"] = (f"the candidate pool has {len(cand)} features, too few for "
                           f"{min_per_group} per group; label at least "
                           f"{int(np.ceil(3 * min_per_group / (1 - train_frac) / 0.8))} features")
        return cand.iloc[:0].assign(group=pd.Series(dtype=str)), info
    ranked = cand.sort_values("pred_clean_score", ascending=False, kind="stable")
    clean = ranked.head(n).assign(group="predicted_clean")
    messy = ranked.tail(n).iloc[::-1].assign(group="predicted_messy")
    used = set(clean["feature"]) | set(messy["feature"])
    rest = cand[~cand["feature"].isin(used)]
    rand = rest.sample(n=n, random_state=seed).assign(group="random_control")
    return pd.concat([clean, messy, rand], ignore_index=True), info


def _spearman_ci(
    a: np.ndarray, b: np.ndarray, n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, float, float]:
    if a.size < 3:
        return float("nan"), float("nan"), float("nan")
    rho = float(spearmanr(a, b).statistic)
    boot = np.array([spearmanr(a[i], b[i]).statistic for i in boot_idx(a.size, n_boot, seed)])
    lo, hi = percentile_ci(boot[:, None], level)
    return rho, float(lo[0]), float(hi[0])


def group_tests(measured: pd.DataFrame, metrics: Sequence[str] = GROUP_METRICS) -> pd.DataFrame:
    """Two-sided Mann–Whitney U tests between the three groups on each metric (≥ 3 per side)."""
    rows = []
    pairs = (("predicted_clean", "predicted_messy"), ("predicted_clean", "random_control"),
             ("predicted_messy", "random_control"))
    for m in metrics:
        if m not in measured.columns:
            continue
        for ga, gb in pairs:
            a = _finite(measured.loc[measured["group"] == ga, m])
            b = _finite(measured.loc[measured["group"] == gb, m])
            if len(a) < 3 or len(b) < 3:
                continue
            try:
                u, p = mannwhitneyu(a, b, alternative="two-sided")
            except ValueError:
                u, p = float("nan"), float("nan")
            rows.append({
                "metric": m, "group_a": ga, "group_b": gb, "n_a": len(a), "n_b": len(b),
                "mean_a": float(a.mean()), "mean_b": float(b.mean()),
                "median_a": float(np.median(a)), "median_b": float(np.median(b)),
                "diff_mean": float(a.mean() - b.mean()), "u": float(u), "p": float(p),
            })
    return pd.DataFrame(rows, columns=["metric", "group_a", "group_b", "n_a", "n_b", "mean_a",
                                       "mean_b", "median_a", "median_b", "diff_mean", "u", "p"])


def _finite(s: pd.Series) -> np.ndarray:
    a = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
    return a[np.isfinite(a)]


def outcome(measured: pd.DataFrame, tests: pd.DataFrame, alpha: float = 0.05) -> dict[str, Any]:
    """Step 7's success flags, the group means behind them, and their significance."""
    def mean(metric: str, group: str) -> float:
        if metric not in measured.columns:
            return float("nan")
        v = _finite(measured.loc[measured["group"] == group, metric])
        return float(v.mean()) if v.size else float("nan")

    def p_of(metric: str) -> float:
        t = tests[(tests["metric"] == metric) & (tests["group_a"] == "predicted_clean")
                  & (tests["group_b"] == "predicted_messy")]
        return float(t["p"].iloc[0]) if len(t) else float("nan")

    out: dict[str, Any] = {}
    for m in (STABILITY, COLLATERAL_PER_EFFECT, EFFECT):
        for g in GROUPS:
            out[f"{g}_{m}"] = mean(m, g)
    cs, ms = out[f"predicted_clean_{STABILITY}"], out[f"predicted_messy_{STABILITY}"]
    cc = out[f"predicted_clean_{COLLATERAL_PER_EFFECT}"]
    mc = out[f"predicted_messy_{COLLATERAL_PER_EFFECT}"]
    s_ok = bool(np.isfinite(cs) and np.isfinite(ms) and cs > ms)
    c_ok = bool(np.isfinite(cc) and np.isfinite(mc) and cc < mc)
    p_s, p_c = p_of(STABILITY), p_of(COLLATERAL_PER_EFFECT)
    out.update(
        success_stability=s_ok, success_collateral=c_ok,
        p_stability=p_s, p_collateral=p_c,
        significant_stability=bool(s_ok and np.isfinite(p_s) and p_s < alpha),
        significant_collateral=bool(c_ok and np.isfinite(p_c) and p_c < alpha),
        outcome="strong" if s_ok and c_ok else "partial" if s_ok or c_ok else "weak",
    )
    return out


@single_blas
def heldout_screening(
    predictors: pd.DataFrame,
    labels: pd.DataFrame,
    measure: Measure | None = None,
    *,
    predictor_set: str = "geometry",
    sets: Mapping[str, Sequence[str]] | None = None,
    train_frac: float = 0.6,
    n_per_group: int = 50,
    seed: int = 0,
    effect_band: tuple[float, float] | None = (0.1, 0.9),
    min_per_group: int = 5,
    n_boot: int = 1000,
    progress: Progress | None = None,
) -> HeldoutResult:
    """Steps 1–7. ``measure`` labels the selected features on new contexts; without it the
    features' existing labels are used (held-out *features*, original contexts — reported as
    ``contexts: original``)."""
    sets_r = resolve_sets(predictors, sets)
    if predictor_set not in sets_r:
        raise SteerscopeError(f"unknown predictor set '{predictor_set}'",
                              f"choose one of {', '.join(sets_r)}")
    cols = geometry_columns(sets_r) if predictor_set == "geometry" else sets_r[predictor_set]
    data = merge(predictors, labels)
    if progress is not None:
        progress("held-out screening: selecting groups", 0.0)
    sel, info = select_groups(data, cols, train_frac=train_frac, n_per_group=n_per_group,
                              seed=seed, effect_band=effect_band, min_per_group=min_per_group,
                              n_boot=n_boot)
    info["predictor_set"] = predictor_set
    if "skipped" in info:
        info["outcome"] = "skipped"
        return HeldoutResult(sel[["feature", "group"]], group_tests(sel.iloc[:0]), info)
    keep = ["feature", "group", "pred_clean_score", "pred_effect_l2", CLEAN_SCORE, EFFECT]
    chosen = sel[keep].rename(columns={CLEAN_SCORE: "train_clean_score",
                                       EFFECT: "train_effect_l2"})
    if measure is None:
        fresh = labels[labels["feature"].isin(chosen["feature"])]
        info["contexts"] = "original"
    else:
        if progress is not None:
            progress("held-out screening: labelling on new contexts", 0.2)
        fresh = measure([int(f) for f in chosen["feature"]])
        info["contexts"] = "new"
        missing = sorted(set(chosen["feature"]) - set(fresh.get("feature", [])))
        if missing:
            raise SteerscopeError(
                f"the held-out labelling returned no row for {len(missing)} selected feature(s) "
                f"(e.g. {missing[0]})", "rerun; delete the cached held-out labels if this repeats")
    fresh = per_effect(fresh.drop(columns=[c for c in ("group",) if c in fresh.columns]))
    measured = chosen.merge(fresh, on="feature", how="left")
    tests = group_tests(measured)
    info.update(outcome(measured, tests))
    if progress is not None:
        progress("held-out screening done", 1.0)
    return HeldoutResult(measured, tests, info)
