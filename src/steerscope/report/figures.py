"""Figures for the report, each returned as a ``data:image/png;base64`` URI.

The report must be ONE file a user can mail or attach to an issue, so figures are embedded PNGs
rather than files beside it or a JavaScript plotting library from a CDN (which would also fail
offline). Figures are drawn on a bare :class:`~matplotlib.figure.Figure` with the Agg canvas —
no pyplot global state, so nothing leaks between figures or into a user's own plotting session.

These functions only draw what they are given; every number was computed by the library.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

GROUP_ORDER = ("predicted_clean", "random_control", "predicted_messy")
GROUP_COLORS = {"predicted_clean": "#2a9d8f", "random_control": "#8d99ae",
                "predicted_messy": "#e76f51"}
TIER_COLORS = {"clean": "#2a9d8f", "uncertain": "#adb5bd", "messy": "#e76f51"}


def to_data_uri(fig: Figure, dpi: int = 110) -> str:
    """Render ``fig`` to a base64 PNG data URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap(univariate: pd.DataFrame, labels: Sequence[str] | None = None) -> str:
    """Predictor × label Spearman ρ (raw labels); a dot marks a bootstrap CI excluding 0."""
    u = univariate
    if "residualised" in u.columns:
        u = u[~u["residualised"].astype(bool)]
    labels = list(labels or dict.fromkeys(u["label"]))
    preds = list(dict.fromkeys(u["predictor"]))
    rho = u.pivot_table(index="predictor", columns="label", values="spearman",
                        aggfunc="first").reindex(index=preds, columns=labels)
    lo = u.pivot_table(index="predictor", columns="label", values="spearman_lo",
                       aggfunc="first").reindex(index=preds, columns=labels)
    hi = u.pivot_table(index="predictor", columns="label", values="spearman_hi",
                       aggfunc="first").reindex(index=preds, columns=labels)
    fig = Figure(figsize=(1.0 + 0.62 * len(labels), 1.2 + 0.27 * len(preds)))
    ax = fig.add_subplot()
    vals = rho.to_numpy(dtype=float)
    vmax = max(0.3, float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 0.3)
    im = ax.imshow(vals, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=55, ha="right", fontsize=8)
    ax.set_yticks(range(len(preds)), preds, fontsize=7.5)
    sig = (lo.to_numpy(dtype=float) > 0) | (hi.to_numpy(dtype=float) < 0)
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if np.isfinite(vals[i, j]):
                ax.text(j, i, f"{vals[i, j]:.2f}" + ("•" if sig[i, j] else ""), ha="center",
                        va="center", fontsize=6,
                        color="white" if abs(vals[i, j]) > 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="Spearman ρ")
    ax.set_title("Spearman ρ, predictor × label (• = 95 % CI excludes 0)", fontsize=9)
    return to_data_uri(fig)


def scatter(x: Sequence[float], y: Sequence[float], xlabel: str, ylabel: str,
            title: str) -> str:
    """The best predictor against its label, one point per labelled feature."""
    fig = Figure(figsize=(5.2, 3.8))
    ax = fig.add_subplot()
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    ax.scatter(xa[ok], ya[ok], s=10, alpha=0.55, color="#264653", edgecolors="none")
    for arr, setter in ((xa[ok], ax.set_xscale), (ya[ok], ax.set_yscale)):
        if arr.size and arr.min() > 0 and arr.max() / max(arr.min(), 1e-300) > 1e3:
            setter("log")  # heavy-tailed statistics (frequencies, counts) read better on log axes
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return to_data_uri(fig)


def cv_bars(cv: pd.DataFrame, sets: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """Ridge CV Spearman per label for the given sets (baselines first), with 95 % CIs."""
    c = cv
    if "residualised" in c.columns:
        c = c[~c["residualised"].astype(bool)]
    c = c[c["model"] == "ridge"]
    labels = list(labels or dict.fromkeys(c["label"]))
    sets = [s for s in sets if s in set(c["set"])]
    fig = Figure(figsize=(7.5, 0.9 + 0.42 * len(labels) * max(1, len(sets)) / 2.2))
    ax = fig.add_subplot()
    h = 0.8 / max(1, len(sets))
    palette = ["#adb5bd", "#6c757d", "#2a9d8f", "#264653", "#e9c46a", "#f4a261", "#e76f51"]
    for k, s in enumerate(sets):
        sub = c[c["set"] == s].set_index("label").reindex(labels)
        v = sub["cv_spearman"].to_numpy(float)
        err = np.vstack([v - sub["cv_spearman_lo"].to_numpy(float),
                         sub["cv_spearman_hi"].to_numpy(float) - v])
        y = np.arange(len(labels)) + (k - (len(sets) - 1) / 2) * h
        ax.barh(y, np.nan_to_num(v), height=h, color=palette[k % len(palette)], label=s,
                xerr=np.nan_to_num(err), error_kw={"elinewidth": 0.7, "capsize": 1.5})
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("cross-validated Spearman (ridge, 5-fold)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return to_data_uri(fig)


def heldout_boxes(features: pd.DataFrame, metrics: Sequence[str]) -> str:
    """Measured labels on new contexts per screened group, one panel per metric."""
    metrics = [m for m in metrics if m in features.columns]
    fig = Figure(figsize=(3.1 * max(1, len(metrics)), 3.3))
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        data, names = [], []
        for g in GROUP_ORDER:
            v = pd.to_numeric(features.loc[features["group"] == g, m], errors="coerce")
            data.append(v[np.isfinite(v)].to_numpy())
            names.append(g.replace("predicted_", "").replace("_control", ""))
        bp = ax.boxplot(data, patch_artist=True, widths=0.6)
        ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
        for patch, g in zip(bp["boxes"], GROUP_ORDER, strict=True):
            patch.set_facecolor(GROUP_COLORS[g])
            patch.set_alpha(0.7)
        ax.set_title(m, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return to_data_uri(fig)


def screen_overview(table: pd.DataFrame, median: float | None) -> str:
    """Every feature's predicted clean score (ranked) with its interval, coloured by tier;
    labelled features' measured scores on top."""
    t = table.sort_values("rank")
    fig = Figure(figsize=(7.5, 3.2))
    ax = fig.add_subplot()
    x = t["rank"].to_numpy()
    ax.fill_between(x, t["pred_lo"].to_numpy(float), t["pred_hi"].to_numpy(float),
                    color="#dee2e6", lw=0, label="conformal interval")
    for tier, color in TIER_COLORS.items():
        m = (t["tier"] == tier).to_numpy()
        ax.scatter(x[m], t["pred_clean_score"].to_numpy(float)[m], s=3, color=color,
                   label=f"{tier} ({int(m.sum())})")
    if "measured_clean_score" in t.columns:
        lab = t[t["measured_clean_score"].notna()]
        ax.scatter(lab["rank"], lab["measured_clean_score"], s=4, color="black", alpha=0.35,
                   label="measured (labelled)")
    if median is not None:
        ax.axhline(median, color="black", lw=0.7, ls="--")
    ax.set_xlabel("rank (1 = predicted cleanest)", fontsize=9)
    ax.set_ylabel("clean score", fontsize=9)
    ax.legend(fontsize=7, markerscale=3, ncol=3, loc="upper right")
    ax.grid(alpha=0.3)
    return to_data_uri(fig)
