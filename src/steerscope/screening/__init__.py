"""Screening: predict steering side effects before intervening, evaluate the prediction, and rank
every feature (Duan §2.6–2.8).

Works on plain DataFrames — ``predictors`` (one row per feature, from :mod:`steerscope.predictors`)
and ``labels`` (one row per labelled feature, from :mod:`steerscope.labels`) — so it can be used
on tables from any run or tool:

>>> ev = evaluate(predictors, labels)                   # univariate, CV vs baselines, verdicts
>>> ho = heldout_screening(predictors, labels, measure)  # clean / messy / random on new contexts
>>> sc = screen_features(predictors, labels, cv=ev.cv)   # all features, conformal intervals

Modules: :mod:`.data` (columns, checks, clean score), :mod:`.evaluation`, :mod:`.heldout`,
:mod:`.screen_all`, :mod:`.summary` (the headline).
"""

from steerscope.screening.data import (
    BASELINES,
    CLEAN_SCORE,
    DEFAULT_TARGETS,
    PRIMARY_TARGETS,
    check_compatible,
    clean_score,
    duan_sets,
    min_labelled,
    resolve_sets,
)
from steerscope.screening.evaluation import (
    Evaluation,
    correlations,
    cross_validate,
    evaluate,
    nuisance_columns,
    residualise,
    verdicts,
)
from steerscope.screening.heldout import HeldoutResult, heldout_screening, select_groups
from steerscope.screening.screen_all import (
    Screen,
    conformal_halfwidth,
    measure_coverage,
    screen_features,
)
from steerscope.screening.summary import headline

__all__ = [
    "BASELINES", "CLEAN_SCORE", "DEFAULT_TARGETS", "PRIMARY_TARGETS", "Evaluation",
    "HeldoutResult", "Screen", "check_compatible", "clean_score", "conformal_halfwidth",
    "correlations", "cross_validate", "duan_sets", "evaluate", "headline", "heldout_screening",
    "measure_coverage", "min_labelled", "nuisance_columns", "residualise", "resolve_sets",
    "screen_features", "select_groups", "verdicts",
]
