"""Duan's predictor sets, named as in the paper, over the columns of ``predictors.parquet``.

The author's script defines the sets by substring rules over every numeric predictor column
(``freq_only``: names containing "freq"; ``activation_magnitude_only``: act_mean/std/max/q95;
...). We apply the same rules, once, to the fixed list of our Duan predictor columns, so the
sets are plain tuples a screening run can rely on. Arad's scores and bookkeeping columns
(``input_score*``, ``output_score*``, the logit-lens / partner lists) are not Duan predictors and
belong to no set. Note that the rules put ``coact_entropy_norm`` in ``activation_shape`` as well
as ``coactivation`` (it contains "entropy"), exactly as in the original.
"""

from __future__ import annotations

from collections.abc import Iterable

from steerscope.predictors.activation import moment_columns
from steerscope.predictors.logits import DIRECT_TOPK

GEOMETRY_COLUMNS = (
    "decoder_norm", "encoder_norm", "encoder_decoder_cos",
    "crowding_max_abs_cos", "crowding_topk_mean_abs_cos", "crowding_topk_sum_abs_cos",
)
DIRECT_LOGIT_COLUMNS = (
    "direct_logit_l2", "direct_logit_linf", "direct_logit_entropy", "direct_logit_effective_vocab",
    *(f"direct_top{k}_abs_mass_frac" for k in DIRECT_TOPK),
)
COACTIVATION_COLUMNS = ("coact_count_mean", "coact_entropy_norm")
ACTIVATION_COLUMNS = (*moment_columns("token_"), *moment_columns("final_"))

#: Every numeric Duan predictor, in table order (the candidate list of the original script).
DUAN_PREDICTORS: tuple[str, ...] = (
    *ACTIVATION_COLUMNS, *GEOMETRY_COLUMNS, *COACTIVATION_COLUMNS, *DIRECT_LOGIT_COLUMNS,
)


def _having(*parts: str, exclude: str | None = None) -> tuple[str, ...]:
    return tuple(
        c for c in DUAN_PREDICTORS
        if any(p in c for p in parts) and (exclude is None or exclude not in c)
    )


_MAGNITUDE = _having("act_mean", "act_std", "act_max", "act_q95")

#: Duan's compact set; ``phase1_final_act_freq`` of the original is our ``final_act_freq``.
_COMPACT = (
    "final_act_freq", "token_act_freq", "token_binary_entropy", "token_activation_entropy_norm",
    "token_act_kurtosis", "coact_entropy_norm", "coact_count_mean", "decoder_norm",
    "crowding_max_abs_cos", "crowding_topk_mean_abs_cos", "crowding_topk_sum_abs_cos",
    "direct_logit_l2", "direct_logit_linf", "direct_logit_effective_vocab",
    "direct_top50_abs_mass_frac", "encoder_decoder_cos",
)

PREDICTOR_SETS: dict[str, tuple[str, ...]] = {
    "freq_only": _having("freq"),
    "activation_magnitude_only": _MAGNITUDE,
    "geometry": _having("crowding", "decoder_norm", "encoder_decoder", "encoder_norm"),
    "crowding": _having("crowding"),
    "direct_logit": _having("direct_"),
    "coactivation": _having("coact"),
    "activation_shape": _having("entropy", "kurtosis", exclude="direct_logit"),
    "compact_no_magnitude": _COMPACT,
    "full_no_magnitude": tuple(c for c in DUAN_PREDICTORS if c not in _MAGNITUDE),
    "full_all": DUAN_PREDICTORS,
}

#: The names in the author's code (``geometry_only`` ...) for the same sets.
DUAN_NAMES: dict[str, str] = {
    "freq_only": "freq_only",
    "activation_magnitude_only": "activation_magnitude_only",
    "geometry_only": "geometry",
    "crowding_only": "crowding",
    "direct_logit_only": "direct_logit",
    "coactivation_only": "coactivation",
    "activation_shape_only": "activation_shape",
    "compact_no_magnitude": "compact_no_magnitude",
    "full_no_magnitude": "full_no_magnitude",
    "full_all": "full_all",
}

#: Phase-4 held-out screening's ridge inputs (methods.md §2.7 step 2).
SCREENING_GEOMETRY: tuple[str, ...] = (
    "decoder_norm", "encoder_decoder_cos", "encoder_norm", "crowding_max_abs_cos",
    "crowding_topk_mean_abs_cos",
)


def predictor_set(name: str, columns: Iterable[str] | None = None) -> list[str]:
    """The columns of set ``name`` (ours or the author's ``*_only`` name), restricted to
    ``columns`` when given (e.g. a table that lacks some predictors)."""
    from steerscope.errors import SteerscopeError

    key = DUAN_NAMES.get(name, name)
    if key not in PREDICTOR_SETS:
        raise SteerscopeError(
            f"unknown predictor set '{name}'", f"use one of {', '.join(PREDICTOR_SETS)}"
        )
    cols = PREDICTOR_SETS[key]
    if columns is None:
        return list(cols)
    have = set(columns)
    return [c for c in cols if c in have]
