"""Pre-intervention predictors for every SAE feature (Duan §2.5) and Arad's scores (§1.2-1.3).

One file per family -- :mod:`.activation` (streamed moments, frequency, q95 sketch, entropies),
:mod:`.geometry` (norms, encoder-decoder cosine, tiled crowding), :mod:`.coactivation` (panel
counts), :mod:`.logits` (direct-logit footprint, logit lens), :mod:`.scores` (input / output
score), :mod:`.sets` (Duan's predictor sets) -- and :mod:`.pipeline`, which streams a corpus once
and assembles ``predictors.parquet``.
"""

from steerscope.predictors.pipeline import (
    COLUMNS,
    PredictorConfig,
    PredictorResult,
    compute_predictors,
    run_predictors,
)
from steerscope.predictors.sets import (
    DUAN_NAMES,
    DUAN_PREDICTORS,
    PREDICTOR_SETS,
    SCREENING_GEOMETRY,
    predictor_set,
)

__all__ = [
    "COLUMNS",
    "DUAN_NAMES",
    "DUAN_PREDICTORS",
    "PREDICTOR_SETS",
    "SCREENING_GEOMETRY",
    "PredictorConfig",
    "PredictorResult",
    "compute_predictors",
    "predictor_set",
    "run_predictors",
]
