"""Figures and the HTML page of a sensitivity run, rendered from the table alone.

Nothing here computes a result: every number drawn or printed is a column of
``sensitivity.parquet`` or a value of the findings/meta dictionaries computed by
:mod:`steerscope.sensitivity.sweep`. Each (family, run) is drawn as its own curve with its own
bootstrap band, so run-to-run variation is visible rather than averaged away. Figures are
matplotlib PNGs embedded as base64, so the page is one self-contained file that works offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

_COLOURS = {
    "isotropic": "#1f77b4", "isotropic_difference": "#1f77b4",
    "cov_mixture": "#d62728", "cov_difference": "#d62728",
    "real_mixture": "#2ca02c", "real_difference": "#2ca02c",
}
_FEATURE_PANELS = (("sae_active", "active features"), ("sae_inactive", "alive, inactive features"),
                   ("sae_dead", "dead features"), ("sae_error", "SAE error directions"))


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _curve(ax: Axes, rows: pd.DataFrame, colour: Any, label: str | None, y: str = "kl",
           style: str = "-", band: bool = True) -> None:
    rows = rows.sort_values("length_rel")
    ax.plot(rows["length_rel"], rows[f"{y}_mean"], style, color=colour, label=label, lw=1.4)
    if band:
        ax.fill_between(rows["length_rel"], rows[f"{y}_lo"], rows[f"{y}_hi"], color=colour,
                        alpha=0.15, lw=0)


def _families(ax: Axes, t: pd.DataFrame, families: list[str], y: str = "kl") -> None:
    for fam in families:
        rows = t[(t["family"] == fam) & (t["sae"] == "")]
        for i, (_run, r) in enumerate(rows.groupby("run")):
            _curve(ax, r, _COLOURS.get(fam, "k"), fam if i == 0 else None, y)


def curves_figure(table: pd.DataFrame, positions: str) -> Figure:
    """KL vs length: the difference panel (old baseline) beside the mixture panel."""
    t = table[(table["positions"] == positions) & (table["sae"] == "")]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, panel, title in ((axes[0], "difference", "difference: toward a target (y − x)"),
                             (axes[1], "mixture", "mixture: independent of x")):
        fams = sorted(t.loc[t["panel"] == panel, "family"].unique())
        _families(ax, t, fams)
        ax.set_title(title)
        ax.set_xlabel("perturbation length / median norm")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if fams:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("KL(clean ‖ perturbed), nats/token")
    return fig


def l2_figure(table: pd.DataFrame, positions: str) -> Figure:
    """L2 change of the last block's residual stream vs length, baselines only."""
    t = table[(table["positions"] == positions) & (table["sae"] == "")
              & (table["panel"].isin(["difference", "mixture"]))]
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    for fam in sorted(t["family"].unique()):
        rows = t[t["family"] == fam]
        style = "--" if fam.endswith("difference") else "-"
        for i, (_run, r) in enumerate(rows.groupby("run")):
            _curve(ax, r, _COLOURS.get(fam, "k"), fam if i == 0 else None, "l2", style)
    ax.set_xlabel("perturbation length / median norm")
    ax.set_ylabel("L2 change at the last layer")
    ax.set_title("downstream L2 change")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _l0_norm(l0s: pd.Series) -> Normalize:
    lo, hi = float(l0s.min()), float(l0s.max())
    if lo > 0 and hi > lo:
        return LogNorm(lo, hi)
    return Normalize(lo, hi if hi > lo else lo + 1)


def features_figure(table: pd.DataFrame, positions: str) -> Figure | None:
    """SAE feature- and error-direction curves, coloured by each SAE's L0, with baselines."""
    t = table[table["positions"] == positions]
    sae_rows = t[t["panel"].isin(["feature", "error"])]
    if sae_rows.empty:
        return None
    norm = _l0_norm(sae_rows["sae_l0"])
    cmap = "viridis"
    from matplotlib import colormaps

    cm = colormaps[cmap]
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, len(_FEATURE_PANELS), sharey=True)
    base = t[t["sae"] == ""]
    for ax, (fam, title) in zip(axes, _FEATURE_PANELS, strict=True):
        for ref, style in (("cov_mixture", "--"), ("isotropic", ":")):
            for i, (_run, r) in enumerate(base[base["family"] == ref].groupby("run")):
                _curve(ax, r, "0.45", ref if i == 0 else None, style=style, band=False)
        rows = sae_rows[sae_rows["family"] == fam]
        for (sae, run), r in rows.groupby(["sae", "run"]):
            l0 = float(r["sae_l0"].iloc[0])
            _curve(ax, r, cm(norm(l0)), f"{sae} (L0 {l0:.1f})" if run == 0 else None)
        ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("length / median norm")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KL(clean ‖ perturbed), nats/token")
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="SAE L0",
                 fraction=0.02, pad=0.01)
    return fig


def substitution_figure(table: pd.DataFrame, positions: str) -> Figure | None:
    """Substitution tests: KL of each test per SAE (bars; one per run) with bootstrap CIs."""
    t = table[(table["positions"] == positions) & (table["panel"] == "substitution")]
    if t.empty:
        return None
    tests = list(dict.fromkeys(t["family"]))
    saes = sorted(t["sae"].unique(), key=lambda s: float(t.loc[t["sae"] == s, "sae_l0"].iloc[0]))
    from matplotlib import colormaps

    cm = colormaps["tab10"]
    fig = Figure(figsize=(max(8, 1.1 * len(tests) * max(1, len(saes)) / 2), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(len(saes), 1)
    n_runs = int(t["run"].max()) + 1
    for j, sae in enumerate(saes):
        rows = t[t["sae"] == sae]
        for run in sorted(rows["run"].unique()):
            r = rows[rows["run"] == run].set_index("family").reindex(tests)
            xs = [i - 0.4 + width * j + width * (run + 0.5) / n_runs for i in range(len(tests))]
            err = [(r["kl_mean"] - r["kl_lo"]).clip(lower=0), (r["kl_hi"] - r["kl_mean"])]
            ax.bar(xs, r["kl_mean"], width / n_runs, color=cm(j % 10), yerr=err, capsize=2,
                   label=f"{sae} (L0 {rows['sae_l0'].iloc[0]:.1f})" if run == 0 else None)
    ax.set_xticks(range(len(tests)))
    ax.set_xticklabels(tests, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("KL(clean ‖ perturbed), nats/token")
    ax.set_title("substitution tests (ε = ‖SAE(x) − x‖ for the ε-preserving baselines)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return fig


def figures(table: pd.DataFrame) -> dict[str, str]:
    """Every figure as base64 PNG, keyed ``<name>-<positions>``."""
    out: dict[str, str] = {}
    for positions in dict.fromkeys(table["positions"]):
        for name, make in (("curves", curves_figure), ("features", features_figure),
                           ("substitution", substitution_figure), ("l2", l2_figure)):
            fig = make(table, positions)
            if fig is not None:
                out[f"{name}-{positions}"] = _png(fig)
    return out


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return html.escape(str(x))


def _findings_html(f: dict[str, Any]) -> str:
    if not f:
        return "<p>No findings (empty table).</p>"
    items = []
    for key, label in (("cov_mixture_over_isotropic", "KL cov-mixture / isotropic"),
                       ("real_mixture_over_cov_mixture", "KL real-mixture / cov-mixture"),
                       ("real_difference_over_cov_difference",
                        "KL real-difference / cov-difference (the confounded comparison)")):
        r = f.get(key)
        if r:
            items.append(f"<li>{label}: median {_fmt(r['median'])} "
                         f"(range {_fmt(r['min'])}–{_fmt(r['max'])} over lengths)</li>")
    cos = f.get("cos_minus_x", {})
    if cos:
        parts = ", ".join(f"{html.escape(k)} {_fmt(v)}" for k, v in sorted(cos.items()))
        items.append(f"<li>mean cos(u, −x) per family: {parts}</li>")
    for sae, e in f.get("saes", {}).items():
        bits = [f"L0 {e['l0']:.1f}"]
        for k in ("substitution_over_eps_cov_mixture", "substitution_over_eps_isotropic"):
            if k in e:
                bits.append(f"{k.replace('_', ' ')} {_fmt(e[k])}")
        for fam in ("sae_active", "sae_inactive", "sae_dead", "sae_error"):
            r = e.get(f"{fam}_over_cov_mixture")
            if r:
                bits.append(f"{fam}/cov-mixture median {_fmt(r['median'])}")
        items.append(f"<li>{html.escape(sae)}: {'; '.join(bits)}</li>")
    if "spearman_l0_vs_active_kl" in f:
        items.append(f"<li>Spearman ρ(L0, active-feature KL at length "
                     f"{_fmt(f['reference_length_rel'])}): "
                     f"{_fmt(f['spearman_l0_vs_active_kl'])}</li>")
    if "e2e" in f:
        items.append(f"<li>e2e vs local SAEs: {html.escape(str(f['e2e']))}</li>")
    return f"<p>Positions: {html.escape(str(f.get('positions')))}</p><ul>{''.join(items)}</ul>"


def render_html(table: pd.DataFrame, meta: dict[str, Any], found: dict[str, Any]) -> str:
    """The self-contained report page."""
    figs = figures(table)
    meta_rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v) if not isinstance(v, dict | list) else html.escape(json.dumps(v, default=str))}</td></tr>"  # noqa: E501
        for k, v in meta.items()
    )
    imgs = "".join(
        f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' "
        f"src='data:image/png;base64,{png}'/>"
        for name, png in figs.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>steerscope sensitivity"
        "</title><style>body{font-family:sans-serif;max-width:1500px;margin:auto}"
        "img{max-width:100%}td,th{text-align:left;padding:2px 8px;vertical-align:top;"
        "font-size:13px}</style></head><body>"
        "<h1>Sensitive directions (Lee &amp; Heimersheim protocol)</h1>"
        f"<h2>Findings</h2>{_findings_html(found)}"
        f"<h2>Figures</h2>{imgs}<h2>Run</h2><table>{meta_rows}</table></body></html>"
    )
