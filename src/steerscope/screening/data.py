"""Column conventions, input checks and the clean score shared by every screening stage.

Screening joins two tables that other stages wrote — ``predictors.parquet`` (one row per SAE
feature, computed without intervening) and ``labels.parquet`` (one row per *labelled* feature,
measured by steering) — so most ways it can go wrong are a mismatch between them: tables from
another SAE or model, too few labelled features for cross-validation, a label that never varies.
Each is caught here and raised as one :class:`~steerscope.errors.SteerscopeError` with a fix,
before any statistics run on garbage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steerscope.errors import SteerscopeError

Progress = Callable[[str, float], None]
"""``progress(what, fraction_done)``: the library reports, the CLI draws (the library never
prints)."""

# --- label columns (Duan §2.4, mixed contexts; names as written by steerscope.labels) ----------
EFFECT = "effect_l2"
STABILITY = "stability_abs"
COLLATERAL = "collateral_count_0.05"
COLLATERAL_PER_EFFECT = "collateral_per_effect"
CLEAN_SCORE = "clean_score"

DEFAULT_TARGETS: tuple[str, ...] = (
    "stability_abs",
    "stability_signed",
    "pairwise_abs",
    "pairwise_signed",
    "effect_cv",
    "effect_l2",
    "downstream_l2",
    "effective_moved",
    "collateral_count_0.05",
    "collateral_per_effect",
    "kl",
    "kl_per_effect",
)
"""Duan's primary targets (§2.4) plus collateral per effect and KL; those present are used."""

PRIMARY_TARGETS: tuple[str, ...] = (
    "stability_abs",
    "stability_signed",
    "pairwise_abs",
    "pairwise_signed",
    "effect_cv",
    "downstream_l2",
    "effective_moved",
    "collateral_count_0.05",
)
"""The GPT-2 script's primary targets: the only ones it also fits gradient boosting on."""

NUISANCE_LABELS: tuple[str, ...] = ("effect_l2", "effect_cv", "strength", "alpha",
                                    "ctx_act_mean", "ctx_act_max")
"""Nuisance columns looked up in the labels table (effect size, effect CV, intervention value,
natural activation over the feature's own contexts), §2.6 residualisation."""

FREQ_ONLY = "freq_only"
ACT_MAG_ONLY = "activation_magnitude_only"
FULL_NO_MAG = "full_no_magnitude"
BASELINES: tuple[str, str] = (FREQ_ONLY, ACT_MAG_ONLY)

MIN_PER_FOLD = 8
"""A fold with fewer labelled features makes its Spearman and R² noise."""


def min_labelled(n_splits: int = 5) -> int:
    """How many labelled features cross-validation with ``n_splits`` folds needs."""
    return MIN_PER_FOLD * n_splits


# --------------------------------------------------------------------------- predictor sets
def numeric_predictors(predictors: pd.DataFrame) -> list[str]:
    """Numeric predictor columns (not the key, not token lists or reason strings)."""
    return [
        c for c in predictors.columns
        if c != "feature" and pd.api.types.is_numeric_dtype(predictors[c])
        and not pd.api.types.is_bool_dtype(predictors[c])
    ]


def duan_sets(columns: Iterable[str]) -> dict[str, list[str]]:
    """Duan's predictor sets from column names alone (the GPT-2 script's rules, §2.5).

    Used when no explicit sets are given and :mod:`steerscope.predictors` exports none, e.g. on
    a predictors table written by another tool.
    """
    cols = list(columns)
    mag_keys = ("act_mean", "act_std", "act_max", "act_q95")
    mag = [c for c in cols if any(k in c for k in mag_keys)]
    shape = [c for c in cols if ("entropy" in c or "kurtosis" in c) and "direct_logit" not in c]
    geometry_keys = ("crowding", "decoder_norm", "encoder_decoder", "encoder_norm")
    compact = [c for c in cols if c not in mag and (
        "freq" in c or "entropy" in c or "kurtosis" in c or "coact" in c
        or c in ("decoder_norm", "encoder_decoder_cos") or "crowding" in c
        or c in ("direct_logit_l2", "direct_logit_linf", "direct_logit_effective_vocab",
                 "effective_vocab", "direct_top50_abs_mass_frac", "top50_abs_mass_frac"))]
    sets = {
        FREQ_ONLY: [c for c in cols if "freq" in c],
        ACT_MAG_ONLY: mag,
        "geometry": [c for c in cols if any(k in c for k in geometry_keys)],
        "crowding": [c for c in cols if "crowding" in c],
        "direct_logit": [c for c in cols if "direct" in c],
        "coactivation": [c for c in cols if "coact" in c],
        "activation_shape": shape,
        "compact_no_magnitude": compact,
        FULL_NO_MAG: [c for c in cols if c not in mag],
        "full_all": cols,
    }
    return {k: v for k, v in sets.items() if v}


def resolve_sets(
    predictors: pd.DataFrame, sets: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[str]]:
    """Predictor sets restricted to numeric columns present in ``predictors``; empty sets dropped.

    Without ``sets``, the definitions exported by :mod:`steerscope.predictors` are used (they
    know the column names that package writes, and leave Arad's scores and bookkeeping columns
    out of every set); a table with other column names falls back to :func:`duan_sets`. Both
    baselines and ``full_no_magnitude`` must survive: every gain is measured against them.
    """
    numeric = numeric_predictors(predictors)
    present = set(numeric)

    def restrict(cand: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        out = {name: [c for c in cols if c in present] for name, cols in cand.items()}
        return {k: v for k, v in out.items() if v}

    if sets is None:
        out = restrict(_package_sets())
        if any(b not in out for b in (*BASELINES, FULL_NO_MAG)):
            out = restrict(duan_sets(numeric))  # a table with other column names
    else:
        out = restrict(sets)
    missing = [b for b in (*BASELINES, FULL_NO_MAG) if b not in out]
    if missing:
        raise SteerscopeError(
            f"the predictors table has no columns for the predictor set(s) {', '.join(missing)}",
            "recompute predictors.parquet with `steerscope predictors` (it writes the "
            "frequency and activation-magnitude columns the baselines need)",
        )
    return out


def _package_sets() -> Mapping[str, Sequence[str]]:
    """The sets :mod:`steerscope.predictors` defines over the columns it writes."""
    try:
        from steerscope.predictors import PREDICTOR_SETS
    except ImportError:
        return {}
    return PREDICTOR_SETS


# --------------------------------------------------------------------------- checks
def check_compatible(
    predictors_manifest: Mapping[str, Any] | None, labels_manifest: Mapping[str, Any] | None
) -> None:
    """Predictors and labels must come from the same model and SAE.

    Joining them by feature index otherwise "works" and correlates unrelated features.
    """
    if not predictors_manifest or not labels_manifest:
        return
    for key, what in (("model", "model"), ("sae", "SAE")):
        a, b = predictors_manifest.get(key), labels_manifest.get(key)
        if a is not None and b is not None and _norm(a) != _norm(b):
            raise SteerscopeError(
                f"predictors and labels come from different {what}s ('{a}' vs '{b}')",
                "recompute one of the tables for the same model and SAE (or use a fresh --out)",
            )


def _norm(x: Any) -> Any:
    """One spelling per model / SAE: a local path by its resolved directory name, a registry
    SAE as ``release/sae_id`` (the stages record paths, names or ``release:sae_id``)."""
    if isinstance(x, list | tuple):
        return tuple(_norm(v) for v in x)
    text = str(x)
    try:
        p = Path(text).expanduser()
        if p.exists():
            return p.resolve().name
    except OSError:
        pass
    return text.replace(":", "/")


def check_tables(predictors: pd.DataFrame, labels: pd.DataFrame) -> None:
    """Both tables keyed by ``feature``; every labelled feature has predictors."""
    for name, df in (("predictors", predictors), ("labels", labels)):
        if "feature" not in df.columns:
            raise SteerscopeError(
                f"the {name} table has no 'feature' column",
                f"pass a {name} table written by steerscope (one row per feature)",
            )
        if df["feature"].duplicated().any():
            dup = int(df.loc[df["feature"].duplicated(), "feature"].iloc[0])
            raise SteerscopeError(
                f"the {name} table lists feature {dup} more than once",
                f"recompute {name}.parquet",
            )
    unknown = sorted(set(labels["feature"]) - set(predictors["feature"]))
    if unknown:
        raise SteerscopeError(
            f"{len(unknown)} labelled feature(s) have no predictors (e.g. feature {unknown[0]}); "
            "the tables come from different SAEs or runs",
            "recompute predictors.parquet for the SAE the labels were measured on",
        )


def resolve_targets(
    labels: pd.DataFrame, targets: Sequence[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Label columns to evaluate, and the defaults skipped with the reason.

    A label named explicitly must exist and vary (``SteerscopeError`` otherwise). Default
    targets that are absent or constant are skipped and reported — a tiny model may move no
    downstream latent by more than τ = 0.1, which should not abort the whole job — but if none is
    left that is an error.
    """
    skipped: dict[str, str] = {}
    explicit = targets is not None
    cand = list(targets) if explicit else [c for c in DEFAULT_TARGETS if c in labels.columns]
    keep: list[str] = []
    for c in cand:
        if c not in labels.columns:
            raise SteerscopeError(
                f"label '{c}' is not in the labels table",
                f"choose from {', '.join(_label_like(labels))}",
            )
        y = pd.to_numeric(labels[c], errors="coerce").to_numpy(dtype=float)
        y = y[np.isfinite(y)]
        if y.size == 0 or np.nanstd(y) < 1e-12:
            reason = ("no finite values" if y.size == 0
                      else f"constant ({y[0]:.4g} for every feature)")
            if explicit:
                raise SteerscopeError(
                    f"label '{c}' is {reason}: nothing to predict",
                    "check the labelling run (strength, downstream SAE, τ) or drop this label",
                )
            skipped[c] = reason
            continue
        keep.append(c)
    if not keep:
        problem = ("no label varies across the labelled features: "
                   + "; ".join(f"{k} {v}" for k, v in skipped.items())) if skipped else \
            "the labels table has none of the expected label columns"
        raise SteerscopeError(
            problem,
            "recompute labels.parquet with `steerscope labels` (a larger strength or more "
            "features)",
        )
    return keep, skipped


def _label_like(labels: pd.DataFrame) -> list[str]:
    return [c for c in labels.columns if c != "feature"
            and pd.api.types.is_numeric_dtype(labels[c])][:20]


def check_enough(n: int, n_splits: int = 5, what: str = "labelled features") -> None:
    """Cross-validation needs :func:`min_labelled` rows."""
    need = min_labelled(n_splits)
    if n < need:
        raise SteerscopeError(
            f"only {n} {what} with finite labels; {n_splits}-fold cross-validation needs at "
            f"least {need} ({MIN_PER_FOLD} per fold)",
            f"label at least {need} features "
            f"(e.g. `steerscope screen --n-labelled {max(need, 300)}`)",
        )


def merge(predictors: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Labelled features with their predictors; label columns win a name clash."""
    check_tables(predictors, labels)
    pred = predictors.drop(columns=[c for c in predictors.columns
                                    if c in labels.columns and c != "feature"])
    return labels.merge(pred, on="feature", how="inner", validate="one_to_one")


# --------------------------------------------------------------------------- clean score
def zscore(x: np.ndarray | pd.Series) -> np.ndarray:
    """Standard score over the finite entries (NaN stays NaN); Duan's ``1e-8`` guard."""
    a = np.asarray(x, dtype=float)
    return (a - np.nanmean(a)) / (np.nanstd(a) + 1e-8)


def collateral_log_per_effect(labels: pd.DataFrame) -> np.ndarray:
    """``log1p(C_0.05) / (|E| + 1e-8)``: collateral per unit of effect, as the clean score uses."""
    need = [c for c in (COLLATERAL, EFFECT) if c not in labels.columns]
    if need:
        raise SteerscopeError(
            f"the labels table has no {', '.join(need)} column(s), which the clean score needs",
            "recompute labels.parquet with `steerscope labels`",
        )
    c = labels[COLLATERAL].to_numpy(dtype=float)
    e = labels[EFFECT].to_numpy(dtype=float)
    return np.log1p(c) / (np.abs(e) + 1e-8)


def clean_score(labels: pd.DataFrame) -> np.ndarray:
    """Duan's clean score (§2.7): ``z(S_abs) − z(log1p(C_0.05) / (|E| + 1e-8))``.

    Higher is cleaner: stable across contexts and little collateral per unit of effect. The z
    scores are taken over the rows given, so scores are comparable only within one table.
    """
    if STABILITY not in labels.columns:
        raise SteerscopeError(
            f"the labels table has no '{STABILITY}' column, which the clean score needs",
            "recompute labels.parquet with `steerscope labels`",
        )
    score = zscore(labels[STABILITY]) - zscore(collateral_log_per_effect(labels))
    finite = score[np.isfinite(score)]
    if finite.size > 1 and np.std(finite) < 1e-9:
        raise SteerscopeError(
            "the clean score is constant: stability_abs and collateral per effect do not vary "
            "across the labelled features",
            "check the labelling run (a strength that moves the logits, a downstream SAE)",
        )
    return score
