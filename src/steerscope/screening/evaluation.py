"""Predictive evaluation (Duan §2.6): do cheap pre-intervention statistics predict side effects?

Three questions, each answered with an uncertainty attached because the labelled samples are
small (hundreds of features) and a point estimate alone invites over-reading:

1. **Univariate**: Spearman and Pearson of every predictor with every label, with percentile
   bootstrap 95 % CIs (features resampled with replacement).
2. **Cross-validated**: 5-fold shuffled, seeded KFold; ridge on standardised predictors (and
   gradient boosting on the primary targets) per predictor set. Reported: CV Spearman of the
   out-of-fold predictions, R², MAE, and the *gain* in CV Spearman over the ``freq_only`` and
   ``activation_magnitude_only`` baselines. The gain's CI bootstraps features over the fixed
   out-of-fold predictions (paired: the same resample for both sets), so it covers sampling noise
   in the evaluation, not refitting noise.
3. **Residualised**: labels are regressed on a nuisance set (effect size, effect CV, strength,
   natural activation mean/max — and frequency, which the original omitted) and the residuals are
   predicted again, for *every* label rather than stability only (the original's other gap).
   By default this is done on ranks, so the residualised univariate ρ is a partial Spearman
   correlation (the independent replication's partial ρ) and heavy-tailed nuisances such as
   frequency are removed even where their effect is monotone but not linear.

A per-label verdict follows Duan's heuristic (robust / weak / none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from steerscope.errors import SteerscopeError
from steerscope.screening.data import (
    ACT_MAG_ONLY,
    BASELINES,
    CLEAN_SCORE,
    FREQ_ONLY,
    FULL_NO_MAG,
    NUISANCE_LABELS,
    PRIMARY_TARGETS,
    Progress,
    check_enough,
    clean_score,
    merge,
    resolve_sets,
    resolve_targets,
)
from steerscope.screening.stats import (
    bh_adjust,
    boot_idx,
    corr_matrix,
    dense_ranks,
    mask_groups,
    p_value,
    percentile_ci,
    quiet_nan,
    records,
    resample_ranks,
    single_blas,
)

DEFAULT_GBM_SETS: tuple[str, ...] = (FREQ_ONLY, ACT_MAG_ONLY, FULL_NO_MAG, "full_all")
"""Gradient boosting is ~100× the cost of a ridge fit; it is run on the baselines and the full
sets (the comparisons the verdict reads), for the primary targets, as the GPT-2 script does."""

ROBUST_RHO, ROBUST_GAIN_FREQ, ROBUST_GAIN_ACT = 0.25, 0.05, 0.0
WEAK_RHO, WEAK_GAIN_FREQ = 0.20, 0.0


# =========================================================================== univariate
@single_blas
def correlations(
    data: pd.DataFrame,
    predictor_cols: Sequence[str],
    label_cols: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Spearman and Pearson of each predictor with each label, with bootstrap CIs.

    Pairs use the rows where both are finite. One long table: ``predictor, label, n, spearman,
    spearman_lo, spearman_hi, spearman_p, pearson, pearson_lo, pearson_hi, pearson_p, q``
    (``q``: Benjamini–Hochberg over the Spearman p values of the table — with hundreds of
    pairs, some |ρ| ≈ 0.15 are chance).
    """
    X = data[list(predictor_cols)].to_numpy(dtype=float)
    Y = data[list(label_cols)].to_numpy(dtype=float)
    P, L = X.shape[1], Y.shape[1]
    res = {k: np.full((P, L), np.nan) for k in
           ("n", "s", "s_lo", "s_hi", "p", "p_lo", "p_hi")}
    for ymask, lab in mask_groups(np.isfinite(Y)):
        fx = np.isfinite(X[ymask])
        for xmask, pred in mask_groups(fx):
            rows = np.flatnonzero(ymask)[xmask]
            block = _corr_block(X[np.ix_(rows, pred)], Y[np.ix_(rows, lab)], n_boot, seed, level)
            for k, v in block.items():
                res[k][np.ix_(pred, lab)] = v
    out = []
    for i, pc in enumerate(predictor_cols):
        for j, lc in enumerate(label_cols):
            n = res["n"][i, j]
            n_i = 0 if np.isnan(n) else int(n)
            s, p = res["s"][i, j], res["p"][i, j]
            out.append({
                "predictor": pc, "label": lc, "n": n_i,
                "spearman": s, "spearman_lo": res["s_lo"][i, j], "spearman_hi": res["s_hi"][i, j],
                "spearman_p": float(p_value(np.array([s]), n_i)[0]) if n_i else np.nan,
                "pearson": p, "pearson_lo": res["p_lo"][i, j], "pearson_hi": res["p_hi"][i, j],
                "pearson_p": float(p_value(np.array([p]), n_i)[0]) if n_i else np.nan,
            })
    df = pd.DataFrame(out)
    df["q"] = bh_adjust(df["spearman_p"].to_numpy())
    return df


def _corr_block(
    X: np.ndarray, Y: np.ndarray, n_boot: int, seed: int, level: float
) -> dict[str, np.ndarray]:
    n = X.shape[0]
    P, L = X.shape[1], Y.shape[1]
    if n < 3:
        nan = np.full((P, L), np.nan)
        return {"n": np.full((P, L), float(n)), "s": nan, "s_lo": nan, "s_hi": nan,
                "p": nan, "p_lo": nan, "p_hi": nan}
    Z = np.concatenate([X, Y], axis=1)
    dense = dense_ranks(Z)
    all_rows = np.arange(n)
    ranks = resample_ranks(dense, all_rows)
    s = corr_matrix(ranks[:, :P], ranks[:, P:])
    p = corr_matrix(X, Y)
    bs = np.empty((n_boot, P, L))
    bp = np.empty((n_boot, P, L))
    for b, idx in enumerate(boot_idx(n, n_boot, seed)):
        r = resample_ranks(dense, idx)
        bs[b] = corr_matrix(r[:, :P], r[:, P:])
        z = Z[idx]
        bp[b] = corr_matrix(z[:, :P], z[:, P:])
    s_lo, s_hi = percentile_ci(bs, level)
    p_lo, p_hi = percentile_ci(bp, level)
    return {"n": np.full((P, L), float(n)), "s": s, "s_lo": s_lo, "s_hi": s_hi,
            "p": p, "p_lo": p_lo, "p_hi": p_hi}


def make_model(kind: str, seed: int = 0) -> Pipeline:
    """Duan's two regressors behind a median imputer (predictors such as the input score are
    NaN for features with too few contexts; the imputer is fitted inside each training fold)."""
    if kind == "ridge":
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), Ridge(alpha=1.0))
    if kind == "gbm":
        return make_pipeline(
            SimpleImputer(strategy="median"),
            GradientBoostingRegressor(max_depth=2, n_estimators=100, learning_rate=0.05,
                                      random_state=seed),
        )
    raise ValueError(f"unknown model kind {kind!r}")


def oof_predictions(
    X: np.ndarray, y: np.ndarray, kind: str, *, n_splits: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-fold predictions from shuffled, seeded KFold (every row predicted once)."""
    folds = kfold(len(y), n_splits, seed)
    if kind == "ridge":
        return ridge_oof(X, y, folds)
    return cross_val_predict(make_model(kind, seed), X, y, cv=folds)


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return float("nan") if ss <= 0 else 1.0 - float(((y - yhat) ** 2).sum()) / ss


@single_blas
def cross_validate(
    data: pd.DataFrame,
    sets: Mapping[str, Sequence[str]],
    label_cols: Sequence[str],
    *,
    models: Sequence[str] = ("ridge", "gbm"),
    gbm_sets: Sequence[str] | None = DEFAULT_GBM_SETS,
    gbm_labels: Sequence[str] | None = (*PRIMARY_TARGETS, CLEAN_SCORE),
    n_splits: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    level: float = 0.95,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """CV metrics for every (label, predictor set, model), and the gain over each baseline.

    Columns: ``label, set, model, n, n_predictors, cv_spearman, cv_spearman_lo, cv_spearman_hi,
    r2, mae`` and, per baseline ``b``, ``gain_vs_<b>, gain_vs_<b>_lo, gain_vs_<b>_hi``.
    ``gbm_sets`` / ``gbm_labels`` (None: all) limit where gradient boosting runs.
    """
    label_cols = list(label_cols)
    Y = data[label_cols].to_numpy(dtype=float)
    groups = mask_groups(np.isfinite(Y))
    for ymask, lab_idx in groups:
        check_enough(int(ymask.sum()), n_splits,
                     f"labelled features (label '{label_cols[lab_idx[0]]}')")

    def runs_gbm(lab: str, name: str) -> bool:
        return ("gbm" in models and (gbm_labels is None or lab in gbm_labels)
                and (gbm_sets is None or name in gbm_sets))

    total = len(groups) * len(sets) * ("ridge" in models) + sum(
        runs_gbm(lab, name) for lab in label_cols for name in sets)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(what, done / max(1, total))

    oof: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    ys: dict[str, np.ndarray] = {}
    for ymask, lab_idx in groups:
        rows_ = np.flatnonzero(ymask)
        labs = [label_cols[j] for j in lab_idx]
        Yg = Y[np.ix_(rows_, lab_idx)]
        for k, lab in enumerate(labs):
            ys[lab] = Yg[:, k]
        folds = kfold(len(rows_), n_splits, seed)
        for name, cols in sets.items():
            X = data[list(cols)].to_numpy(dtype=float)[rows_]
            if "ridge" in models:
                P = ridge_oof(X, Yg, folds)
                for k, lab in enumerate(labs):
                    oof.setdefault((lab, "ridge"), {})[name] = P[:, k]
                tick(f"cross-validating {name} (ridge)")
            for k, lab in enumerate(labs):
                if runs_gbm(lab, name):
                    oof.setdefault((lab, "gbm"), {})[name] = oof_predictions(
                        X, Yg[:, k], "gbm", n_splits=n_splits, seed=seed)
                    tick(f"cross-validating {name} on {lab} (gradient boosting)")
    rows: list[dict[str, Any]] = []
    for lab in label_cols:
        for kind in models:
            got = oof.get((lab, kind))
            if not got:
                continue
            names = list(got)
            preds = np.column_stack([got[n] for n in names])
            rows.extend(_cv_rows(lab, kind, names, sets, ys[lab], preds, n_boot, seed, level))
    return pd.DataFrame(rows)


def kfold(n: int, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffled, seeded KFold index pairs (sklearn's, so folds match ``cross_val_predict``)."""
    return list(KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(n)))


def ridge_oof(
    X: np.ndarray, Y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
    alpha: float = 1.0,
) -> np.ndarray:
    """Out-of-fold predictions of median-impute → standardise → ridge, for many labels at once.

    The same model as :func:`make_model` ``("ridge")`` (tested equal to it), solved in closed
    form: with ~10 predictor sets × ~15 labels × 5 folds the sklearn pipeline's per-call
    overhead, not the algebra, was most of the evaluation's run time.
    """
    Y2 = Y.reshape(len(Y), -1)
    out = np.empty(Y2.shape)
    for train, test in folds:
        out[test] = ridge_fit_predict(X[train], Y2[train], X[test], alpha)
    return out.reshape(Y.shape)


def ridge_fit_predict(
    X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray, alpha: float = 1.0
) -> np.ndarray:
    """Median-impute → standardise → ridge (with intercept), fitted on the training rows."""
    with quiet_nan():
        med = np.nanmedian(X_train, axis=0)
    keep = np.isfinite(med)  # SimpleImputer drops all-NaN columns
    Xt = np.where(np.isnan(X_train[:, keep]), med[keep], X_train[:, keep])
    Xs = np.where(np.isnan(X_test[:, keep]), med[keep], X_test[:, keep])
    mu = Xt.mean(axis=0)
    sd = Xt.std(axis=0)
    sd[sd < 10 * np.finfo(float).eps * np.maximum(1.0, np.abs(mu))] = 1.0
    Zt = (Xt - mu) / sd
    Zs = (Xs - mu) / sd
    zm = Zt.mean(axis=0)
    ym = Y_train.mean(axis=0)
    Zc = Zt - zm
    A = Zc.T @ Zc + alpha * np.eye(Zc.shape[1])
    W = np.linalg.solve(A, Zc.T @ (Y_train - ym))
    return (Zs - zm) @ W + ym


def _cv_rows(
    lab: str, kind: str, names: list[str], sets: Mapping[str, Sequence[str]], y: np.ndarray,
    preds: np.ndarray, n_boot: int, seed: int, level: float,
) -> list[dict[str, Any]]:
    """Metrics of each set's out-of-fold predictions, bootstrap CIs of their Spearman and of the
    paired differences to the baselines."""
    Z = np.concatenate([y[:, None], preds], axis=1)
    dense = dense_ranks(Z)
    n = y.size
    point = corr_matrix(resample_ranks(dense, np.arange(n))[:, :1],
                  resample_ranks(dense, np.arange(n))[:, 1:])[0]
    boot = np.empty((n_boot, len(names)))
    for b, idx in enumerate(boot_idx(n, n_boot, seed)):
        r = resample_ranks(dense, idx)
        boot[b] = corr_matrix(r[:, :1], r[:, 1:])[0]
    lo, hi = percentile_ci(boot, level)
    out = []
    for i, name in enumerate(names):
        row: dict[str, Any] = {
            "label": lab, "set": name, "model": kind, "n": int(n),
            "n_predictors": len(sets[name]),
            "cv_spearman": float(point[i]), "cv_spearman_lo": float(lo[i]),
            "cv_spearman_hi": float(hi[i]),
            "r2": _r2(y, preds[:, i]), "mae": float(np.abs(y - preds[:, i]).mean()),
        }
        for base in BASELINES:
            key = f"gain_vs_{base}"
            if base in names:
                j = names.index(base)
                d_lo, d_hi = percentile_ci(boot[:, i] - boot[:, j], level)
                row[key] = float(point[i] - point[j])
                row[f"{key}_lo"], row[f"{key}_hi"] = float(d_lo), float(d_hi)
            else:
                row[key] = row[f"{key}_lo"] = row[f"{key}_hi"] = float("nan")
        out.append(row)
    return out


# =========================================================================== residualisation
def nuisance_columns(data: pd.DataFrame, sets: Mapping[str, Sequence[str]]) -> list[str]:
    """The nuisance set: effect size and CV, strength, natural activation mean/max, frequency.

    Label-side columns are used when the labels table has them (a strength column that is
    constant — one global α, Duan's default — carries no information and is dropped); the natural
    activation falls back to the activation-magnitude predictors' mean/max columns, and frequency
    is every ``freq_only`` column.
    """
    cols = [c for c in NUISANCE_LABELS if c in data.columns]
    if not any(c.startswith("ctx_act") for c in cols):
        cols += [c for c in sets.get(ACT_MAG_ONLY, ()) if "mean" in c or "max" in c]
    cols += list(sets.get(FREQ_ONLY, ()))
    cols = list(dict.fromkeys(cols))
    keep = []
    for c in cols:
        v = data[c].to_numpy(dtype=float)
        if np.isfinite(v).sum() > 2 and np.nanstd(v) > 1e-12:
            keep.append(c)
    return keep


def rank_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Average ranks scaled to [0, 1] per column (NaN stays NaN)."""
    return df.rank(method="average", pct=True)


@single_blas
def residualise(
    data: pd.DataFrame, cols: Sequence[str], nuisance: Sequence[str], *, method: str = "rank"
) -> pd.DataFrame:
    """Columns minus a standardised ridge fit on the nuisance set, fitted on all rows (§2.6).

    ``method="rank"`` (default) works on ranks — the column's ranks regressed on the nuisance
    columns' ranks — so correlations of residuals are partial Spearman correlations (the
    replication's partial ρ) and a nuisance that acts monotonically but not linearly (frequency,
    heavy-tailed counts) is removed too; on raw values a linear fit leaves most of a log-shaped
    frequency effect in place. ``method="linear"`` is Duan's raw-value version. Columns that are
    themselves nuisance columns are not residualised (nothing would be left).
    """
    if method not in ("rank", "linear"):
        raise ValueError(f"unknown residualisation method {method!r}")
    out = pd.DataFrame(index=data.index)
    targets = [c for c in cols if c not in nuisance]
    if not nuisance or not targets:
        return out
    N = data[list(nuisance)].astype(float)
    Y = data[targets].astype(float)
    if method == "rank":
        N, Y = rank_columns(N), rank_columns(Y)
    Nv, Yv = N.to_numpy(), Y.to_numpy()
    res = np.full(Yv.shape, np.nan)
    for ymask, idx in mask_groups(np.isfinite(Yv)):
        if ymask.sum() > len(nuisance) + 2:
            rows = np.flatnonzero(ymask)
            block = Yv[np.ix_(rows, idx)]
            res[np.ix_(rows, idx)] = block - ridge_fit_predict(Nv[rows], block, Nv[rows])
    for j, c in enumerate(targets):
        out[c] = res[:, j]
    return out


# =========================================================================== verdicts
def verdicts(univariate: pd.DataFrame, cv: pd.DataFrame) -> pd.DataFrame:
    """Duan's heuristic per label, on ridge CV Spearman of ``full_no_magnitude``:

    robust — best |ρ| ≥ 0.25, gain over freq_only ≥ 0.05 and over activation magnitude ≥ 0;
    weak   — best |ρ| ≥ 0.20 and gain over freq_only ≥ 0 (the author's "promising but
    borderline"); none — otherwise. ``gain_ci_positive`` adds what the heuristic lacks: whether
    the bootstrap CI of the gain over freq_only excludes zero. Residualised evidence is reported
    beside it (``resid_*``), not folded into the verdict, so the verdict stays Duan's.
    """
    univariate = _with_flag(univariate)
    cv = _with_flag(cv)
    raw, res_u = univariate[~univariate["residualised"]], univariate[univariate["residualised"]]
    ridge = cv[cv["model"] == "ridge"]
    raw_cv, res_cv = ridge[~ridge["residualised"]], ridge[ridge["residualised"]]
    rows = []
    for lab in dict.fromkeys(raw["label"]):
        u = raw[raw["label"] == lab].dropna(subset=["spearman"])
        row: dict[str, Any] = {"label": lab}
        if len(u):
            best = u.loc[u["spearman"].abs().idxmax()]
            row.update(best_predictor=best["predictor"], best_rho=float(best["spearman"]),
                       best_rho_lo=float(best["spearman_lo"]),
                       best_rho_hi=float(best["spearman_hi"]), best_q=float(best["q"]))
        else:
            row.update(best_predictor=None, best_rho=np.nan, best_rho_lo=np.nan,
                       best_rho_hi=np.nan, best_q=np.nan)
        full = raw_cv[(raw_cv["label"] == lab) & (raw_cv["set"] == FULL_NO_MAG)]
        f = full.iloc[0] if len(full) else None
        for base in BASELINES:
            key = f"gain_vs_{base}"
            for suf in ("", "_lo", "_hi"):
                row[key + suf] = float(f[key + suf]) if f is not None else np.nan
        row["full_cv_spearman"] = float(f["cv_spearman"]) if f is not None else np.nan
        g_f, g_a = row[f"gain_vs_{FREQ_ONLY}"], row[f"gain_vs_{ACT_MAG_ONLY}"]
        rho = abs(row["best_rho"]) if np.isfinite(row["best_rho"]) else 0.0
        if rho >= ROBUST_RHO and g_f >= ROBUST_GAIN_FREQ and g_a >= ROBUST_GAIN_ACT:
            verdict = "robust"
        elif rho >= WEAK_RHO and g_f >= WEAK_GAIN_FREQ:
            verdict = "weak"
        else:
            verdict = "none"
        row["verdict"] = verdict
        row["gain_ci_positive"] = bool(np.isfinite(row[f"gain_vs_{FREQ_ONLY}_lo"])
                                       and row[f"gain_vs_{FREQ_ONLY}_lo"] > 0)
        ru = res_u[res_u["label"] == lab].dropna(subset=["spearman"])
        if len(ru):
            rb = ru.loc[ru["spearman"].abs().idxmax()]
            row.update(resid_best_predictor=rb["predictor"], resid_best_rho=float(rb["spearman"]),
                       resid_best_rho_lo=float(rb["spearman_lo"]),
                       resid_best_rho_hi=float(rb["spearman_hi"]))
        rf = res_cv[(res_cv["label"] == lab) & (res_cv["set"] == FULL_NO_MAG)]
        if len(rf):
            row.update(resid_full_cv_spearman=float(rf.iloc[0]["cv_spearman"]),
                       resid_full_cv_spearman_lo=float(rf.iloc[0]["cv_spearman_lo"]),
                       resid_full_cv_spearman_hi=float(rf.iloc[0]["cv_spearman_hi"]))
        rows.append(row)
    return pd.DataFrame(rows)


def _with_flag(df: pd.DataFrame) -> pd.DataFrame:
    if "residualised" in df.columns:
        return df.assign(residualised=df["residualised"].astype(bool))
    return df.assign(residualised=False)


# =========================================================================== all of it
@dataclass
class Evaluation:
    """Everything the predictive evaluation produced, as tables (see :meth:`to_json`)."""

    data: pd.DataFrame  # labelled features: labels (+ clean_score) and predictors
    targets: list[str]
    sets: dict[str, list[str]]
    nuisance: list[str]
    univariate: pd.DataFrame
    cv: pd.DataFrame
    verdicts: pd.DataFrame
    skipped_labels: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(len(self.data))

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN → null) with keys ``univariate``, ``cv``, ``verdicts`` …"""
        return {
            "n_features": self.n_features,
            "targets": self.targets,
            "skipped_labels": self.skipped_labels,
            "sets": self.sets,
            "nuisance": self.nuisance,
            "settings": self.settings,
            "univariate": records(self.univariate),
            "cv": records(self.cv),
            "verdicts": records(self.verdicts),
        }


@single_blas
def evaluate(
    predictors: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    sets: Mapping[str, Sequence[str]] | None = None,
    targets: Sequence[str] | None = None,
    n_splits: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    level: float = 0.95,
    models: Sequence[str] = ("ridge", "gbm"),
    gbm_sets: Sequence[str] | None = DEFAULT_GBM_SETS,
    gbm_labels: Sequence[str] | None = (*PRIMARY_TARGETS, CLEAN_SCORE),
    residualise_labels: bool = True,
    residual_method: str = "rank",
    progress: Progress | None = None,
) -> Evaluation:
    """The whole §2.6 evaluation of ``predictors`` (all features) against ``labels`` (some).

    The clean score (§2.7) is added as one more label when the labels table has its inputs, so
    the screen's target is evaluated like the others.
    """
    def report(what: str, frac: float) -> None:
        if progress is not None:
            progress(what, frac)

    sets_r = resolve_sets(predictors, sets)
    keep, skipped = resolve_targets(labels, targets)
    data = merge(predictors, labels)
    check_enough(len(data), n_splits)
    if targets is None:
        try:
            data[CLEAN_SCORE] = clean_score(data)
            keep.append(CLEAN_SCORE)
        except SteerscopeError as exc:  # no inputs, or constant: the other labels still count
            skipped[CLEAN_SCORE] = exc.problem
    all_preds = list(dict.fromkeys(c for cols in sets_r.values() for c in cols))
    report("univariate correlations", 0.0)
    univ = correlations(data, all_preds, keep, n_boot=n_boot, seed=seed, level=level)
    univ["residualised"] = False
    # CV share of the progress bar: 0.1 → 0.75 raw, 0.75 → 0.95 residualised.
    cv = cross_validate(
        data, sets_r, keep, models=models, gbm_sets=gbm_sets, gbm_labels=gbm_labels,
        n_splits=n_splits, seed=seed, n_boot=n_boot, level=level,
        progress=lambda w, f: report(w, 0.1 + 0.65 * f),
    )
    cv["residualised"] = False
    nuis: list[str] = []
    if residualise_labels:
        nuis = nuisance_columns(data, sets_r)
        resid = residualise(data, keep, nuis, method=residual_method)
        if resid.shape[1]:
            report("residualised correlations", 0.75)
            # partial correlations: the predictors are residualised on the nuisance too
            preds_r = [c for c in all_preds if c not in nuis]
            rx = residualise(data, preds_r, nuis, method=residual_method)
            ru = correlations(pd.concat([rx, resid], axis=1), preds_r, list(resid.columns),
                              n_boot=n_boot, seed=seed, level=level)
            if residual_method == "rank":  # Pearson of rank residuals IS partial Spearman
                for k in ("", "_lo", "_hi", "_p"):
                    ru[f"spearman{k}"] = ru[f"pearson{k}"]
                ru["q"] = bh_adjust(ru["spearman_p"].to_numpy())
            ru["residualised"] = True
            rdata = pd.concat([data[all_preds], resid], axis=1)
            rcv = cross_validate(
                rdata, sets_r, list(resid.columns), models=("ridge",), n_splits=n_splits,
                seed=seed, n_boot=n_boot, level=level,
                progress=lambda w, f: report("residualised " + w, 0.8 + 0.15 * f),
            )
            rcv["residualised"] = True
            univ = pd.concat([univ, ru], ignore_index=True)
            cv = pd.concat([cv, rcv], ignore_index=True)
    verd = verdicts(univ, cv)
    report("evaluation done", 1.0)
    return Evaluation(
        data=data, targets=keep, sets=sets_r, nuisance=nuis, univariate=univ, cv=cv,
        verdicts=verd, skipped_labels=skipped,
        settings={"n_splits": n_splits, "seed": seed, "n_boot": n_boot, "level": level,
                  "models": list(models), "gbm_sets": None if gbm_sets is None else list(gbm_sets),
                  "gbm_labels": None if gbm_labels is None else list(gbm_labels),
                  "ridge_alpha": 1.0, "residualisation": residual_method,
                  "gbm": {"max_depth": 2, "n_estimators": 100, "learning_rate": 0.05}},
    )
