"""The paper's four findings (methods.md §3.5) as numbers, from the sweep table alone.

Computed here, not in the report, so the HTML page, the manifest and the tests read the same
values. Ratios are of run-averaged mean KL at equal relative length.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from steerscope.sensitivity.directions import SAE_FAMILIES


def findings(table: pd.DataFrame, reference_length: float | None = None) -> dict[str, Any]:
    """The paper's four findings as numbers (computed here so the report only renders).

    Ratios are of run-averaged mean KL at equal relative length. ``reference_length`` (relative)
    is where the L0 ordering of SAE feature directions is read; by default the grid point
    closest to 0.3 of the median norm.
    """
    if table.empty:
        return {}
    pos = "all" if (table["positions"] == "all").any() else "last"
    t = table[table["positions"] == pos]
    sweep = t[t["panel"] != "substitution"]
    mean_kl = sweep.groupby(["family", "sae", "length_rel"])["kl_mean"].mean()
    out: dict[str, Any] = {"positions": pos}
    lengths = sorted(sweep["length_rel"].unique())

    def curve(family: str, sae: str = "") -> pd.Series | None:
        try:
            return mean_kl.loc[(family, sae)]
        except KeyError:
            return None

    def ratio(a: str, b: str, sae_a: str = "") -> dict[str, Any] | None:
        ca, cb = curve(a, sae_a), curve(b)
        if ca is None or cb is None:
            return None
        r = (ca / cb).dropna()
        return {"length_rel": [float(v) for v in r.index], "ratio": [float(v) for v in r],
                "median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}

    out["cov_mixture_over_isotropic"] = ratio("cov_mixture", "isotropic")
    out["real_mixture_over_cov_mixture"] = ratio("real_mixture", "cov_mixture")
    out["real_difference_over_cov_difference"] = ratio("real_difference", "cov_difference")
    out["cos_minus_x"] = {
        f: float(v) for f, v in sweep[sweep["sae"] == ""].groupby("family")["cos_minus_x"]
        .mean().items()
    }
    subs = t[t["panel"] == "substitution"].groupby(["sae", "family"])["kl_mean"].mean()
    per_sae: dict[str, Any] = {}
    for sae in sorted(s for s in t["sae"].unique() if s):
        entry: dict[str, Any] = {"l0": float(t.loc[t["sae"] == sae, "sae_l0"].iloc[0])}
        if sae in subs.index.get_level_values(0):
            s = subs.loc[sae]
            for base in ("eps_cov_mixture", "eps_isotropic", "eps_real_mixture"):
                if "substitution" in s.index and base in s.index:
                    entry[f"substitution_over_{base}"] = float(s["substitution"] / s[base])
        for fam in SAE_FAMILIES:
            r = ratio(fam, "cov_mixture", sae)
            if r is not None:
                entry[f"{fam}_over_cov_mixture"] = r
        per_sae[sae] = entry
    out["saes"] = per_sae
    if lengths and per_sae:
        ref = reference_length if reference_length is not None else min(
            lengths, key=lambda v: abs(v - 0.3))
        out["reference_length_rel"] = float(ref)
        pairs = []
        for sae, entry in per_sae.items():
            c = curve("sae_active", sae)
            if c is not None and ref in c.index:
                pairs.append((entry["l0"], float(c.loc[ref]), sae))
        out["active_kl_by_l0"] = [{"sae": s, "l0": l0, "kl": kl} for l0, kl, s in sorted(pairs)]
        if len(pairs) >= 3:
            from scipy.stats import spearmanr

            rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
            out["spearman_l0_vs_active_kl"] = float(rho)
    out["e2e"] = "not applicable: no end-to-end SAEs exist for this model"
    return out
