"""The headline: the few numbers a user (and Duan's Table 2) asks for first.

Computed once from ``evaluation.json``'s content and stored in it under ``headline``, so the
terminal and the HTML report show the same numbers and neither computes anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerscope.screening.data import ACT_MAG_ONLY, FREQ_ONLY, FULL_NO_MAG

TABLE2_TARGETS = ("collateral_count_0.05", "stability_abs", "stability_signed")
"""The labels of Duan's Table 2 (downstream count, stability): the headline's "strongest
relation" is taken among these, so it compares like with like — effect size and KL follow the
decoder norm almost trivially when strength is in raw decoder units, and would always win."""


def headline(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Best predictor per label with ρ and CI, the full set's CV gain over each baseline (with
    CI), the verdicts, the held-out outcome and the screen's measured coverage. ``best`` is the
    strongest relation among Duan's Table 2 labels; ``best_residualised`` the strongest after
    residualising those labels on the nuisance set (the replication's partial-ρ view).

    ``evaluation`` is the dict written to ``evaluation.json`` (keys ``verdicts``, ``heldout``,
    ``screen``, …); missing parts are simply absent from the headline.
    """
    rows = []
    for v in evaluation.get("verdicts", []):
        rows.append({
            "label": v["label"],
            "best_predictor": v.get("best_predictor"),
            "rho": v.get("best_rho"), "rho_lo": v.get("best_rho_lo"),
            "rho_hi": v.get("best_rho_hi"),
            "full_cv_spearman": v.get("full_cv_spearman"),
            **{f"gain_vs_{b}{s}": v.get(f"gain_vs_{b}{s}")
               for b in (FREQ_ONLY, ACT_MAG_ONLY) for s in ("", "_lo", "_hi")},
            "verdict": v.get("verdict"),
            "resid_best_predictor": v.get("resid_best_predictor"),
            "resid_rho": v.get("resid_best_rho"), "resid_rho_lo": v.get("resid_best_rho_lo"),
            "resid_rho_hi": v.get("resid_best_rho_hi"),
            "resid_full_cv_spearman": v.get("resid_full_cv_spearman"),
        })
    table2 = [r for r in rows if r["label"] in TABLE2_TARGETS and r["rho"] is not None]
    best = max(table2 or [r for r in rows if r["rho"] is not None],
               key=lambda r: abs(r["rho"]), default=None)
    resid = [v for v in evaluation.get("verdicts", []) if v["label"] in TABLE2_TARGETS
             and v.get("resid_best_rho") is not None]
    best_resid = max(resid, key=lambda v: abs(v["resid_best_rho"]), default=None)
    gains = [r[f"gain_vs_{FREQ_ONLY}"] for r in rows if r[f"gain_vs_{FREQ_ONLY}"] is not None]
    out: dict[str, Any] = {
        "n_labelled": evaluation.get("n_features"),
        "full_set": FULL_NO_MAG,
        "labels": rows,
        "best": best,
        "best_residualised": None if best_resid is None else {
            "label": best_resid["label"], "best_predictor": best_resid["resid_best_predictor"],
            "rho": best_resid["resid_best_rho"], "rho_lo": best_resid.get("resid_best_rho_lo"),
            "rho_hi": best_resid.get("resid_best_rho_hi")},
        "verdict_counts": {k: sum(r["verdict"] == k for r in rows)
                           for k in ("robust", "weak", "none")},
        "full_beats_freq": {"labels": sum(g > 0 for g in gains), "of": len(gains)},
    }
    ho = evaluation.get("heldout")
    if ho:
        s = ho.get("summary", ho)
        out["heldout"] = {k: s.get(k) for k in (
            "outcome", "success_stability", "success_collateral", "p_stability", "p_collateral",
            "significant_stability", "significant_collateral", "n_per_group", "contexts",
            "pool_spearman", "pool_spearman_lo", "pool_spearman_hi", "predictor_set", "skipped",
            "predicted_clean_stability_abs", "predicted_messy_stability_abs",
            "random_control_stability_abs", "predicted_clean_collateral_per_effect",
            "predicted_messy_collateral_per_effect", "random_control_collateral_per_effect",
        ) if k in s}
    sc = evaluation.get("screen")
    if sc:
        out["screen"] = {
            "predictor_set": sc.get("predictor_set"), "model": sc.get("model"),
            "level": sc.get("level"), "coverage": (sc.get("coverage") or {}).get("measured"),
            "median_width": (sc.get("coverage") or {}).get("median_width"),
            "tiers": sc.get("tiers"), "n_features": sc.get("n_features"),
        }
    return out
