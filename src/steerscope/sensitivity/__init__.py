"""Sensitive-direction experiments (Lee & Heimersheim 2024; methods.md §3).

How much does the next-token distribution change when the residual stream moves a given length
along a direction, and are SAE directions special? The package is split by concern:

* :mod:`.stats` — site statistics (μ, Σ + 0.01·I, median norm; BOS excluded), per-token KL,
  cluster-bootstrap CIs, input checks;
* :mod:`.directions` — the direction families (difference / mixture baselines, SAE feature and
  error directions) and the substitution tests;
* :mod:`.runner` — the forward machinery (last-position replay over the cached clean prefix;
  all-position forwards that skip the blocks below the site);
* :mod:`.sweep` — the sweeps and the result table (one row per family × length × run);
* :mod:`.analysis` — the paper's four findings as numbers, from the table;
* :mod:`.figures` — figures and the HTML page, rendered from the table only;
* :mod:`.pipeline` — the embedded default end to end (what ``steerscope sensitivity`` runs).
"""

from steerscope.sensitivity.analysis import findings
from steerscope.sensitivity.directions import (
    BASE_FAMILIES,
    DIFFERENCE_FAMILIES,
    MIXTURE_FAMILIES,
    SAE_FAMILIES,
    SUBSTITUTIONS,
    FeatureCategories,
    base_directions,
    error_directions,
    feature_categories,
    feature_directions,
    substitute,
)
from steerscope.sensitivity.runner import (
    AllPositionsRunner,
    LastPositionRunner,
    layer_ceiling,
    naive_forward_kl,
)
from steerscope.sensitivity.stats import (
    SiteStats,
    bootstrap_mean_ci,
    check_lengths,
    kl_per_token,
    site_statistics,
)
from steerscope.sensitivity.sweep import (
    DEFAULT_LENGTHS,
    DEFAULT_SITE,
    SensitivityConfig,
    SensitivityResult,
    run_sensitivity,
)

__all__ = [
    "BASE_FAMILIES", "DEFAULT_LENGTHS", "DEFAULT_SITE", "DIFFERENCE_FAMILIES", "MIXTURE_FAMILIES",
    "SAE_FAMILIES", "SUBSTITUTIONS", "AllPositionsRunner", "FeatureCategories",
    "LastPositionRunner", "SensitivityConfig", "SensitivityResult", "SiteStats",
    "base_directions", "bootstrap_mean_ci", "check_lengths", "error_directions",
    "feature_categories", "feature_directions", "findings", "kl_per_token", "layer_ceiling",
    "naive_forward_kl", "run_sensitivity", "site_statistics", "substitute",
]
