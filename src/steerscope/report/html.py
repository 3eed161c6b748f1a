"""One self-contained HTML page from :class:`~steerscope.report.data.ReportData`.

No scripts, no external stylesheets, fonts or images: the page renders offline, from a mail
attachment, with nothing to fail to load. Every string from the data (feature tokens, corpus
snippets, model names) is HTML-escaped — tokens of real vocabularies contain ``<``, ``&`` and
control bytes.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from steerscope.report import figures
from steerscope.report.data import FeatureCard, ReportData

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#212529;
background:#f8f9fa;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:1.5rem}
h1{font-size:1.6rem;margin:.2rem 0}h2{font-size:1.25rem;margin-top:2.2rem;
border-bottom:2px solid #dee2e6;padding-bottom:.3rem}h3{font-size:1.05rem;margin:.2rem 0}
.meta{color:#6c757d;font-size:.85rem}
.headline{background:#fff;border-left:6px solid #2a9d8f;padding:1rem 1.2rem;margin:1rem 0;
box-shadow:0 1px 3px rgba(0,0,0,.08)}
.headline p{margin:.35rem 0}
table{border-collapse:collapse;font-size:.82rem;background:#fff;margin:.6rem 0}
th,td{border:1px solid #dee2e6;padding:.25rem .45rem;text-align:right;vertical-align:top}
th{background:#e9ecef}td.l,th.l{text-align:left}
.robust{color:#1b7f4c;font-weight:600}.weak{color:#b07d00;font-weight:600}
.none{color:#6c757d}.skipped{color:#6c757d}
.strong{color:#1b7f4c;font-weight:600}.partial{color:#b07d00;font-weight:600}
img{max-width:100%;height:auto;background:#fff}
figure{margin:.8rem 0}figcaption{font-size:.8rem;color:#6c757d}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:.9rem}
.card{background:#fff;border-radius:6px;padding:.8rem 1rem;
box-shadow:0 1px 3px rgba(0,0,0,.1);font-size:.83rem;overflow-wrap:anywhere}
.card table{width:100%;font-size:.76rem}.card th{overflow-wrap:normal}
.tier{display:inline-block;border-radius:3px;padding:0 .4rem;color:#fff;font-size:.75rem}
.tier-clean{background:#2a9d8f}.tier-messy{background:#e76f51}
.tier-uncertain{background:#868e96}
.tok{font-family:ui-monospace,monospace;background:#e9ecef;border-radius:3px;padding:0 .2rem;
margin:0 .1rem;white-space:pre-wrap;word-break:break-all}
.snip{font-family:ui-monospace,monospace;font-size:.75rem;background:#f1f3f5;padding:.2rem .4rem;
margin:.15rem 0;white-space:pre-wrap;word-break:break-word}
.snip mark{background:#ffd166}
.gen{font-size:.78rem;white-space:pre-wrap;word-break:break-word;margin:.1rem 0}
.gen b{color:#495057}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def num(x: Any, d: int = 2) -> str:
    """A number for display; missing values as an em dash."""
    if x is None:
        return "—"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return esc(x)
    if not math.isfinite(v):
        return "—"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 10 ** (-d)):
        return f"{v:.{d}e}"
    return f"{v:.{d}f}"


def ci(lo: Any, hi: Any, d: int = 2) -> str:
    return f"[{num(lo, d)}, {num(hi, d)}]"


def pval(p: Any) -> str:
    if p is None or not isinstance(p, int | float) or not math.isfinite(p):
        return "—"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """An HTML table; cells are already-escaped HTML; the first ``left`` columns align left."""
    th = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>"
                 for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                         for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def fig(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}' \
           "</figcaption></figure>"


# =========================================================================== sections
def headline_section(h: Mapping[str, Any]) -> str:
    """The headline: the sentences a reader takes away, then the per-label table."""
    parts = []
    best = h.get("best")
    if best:
        parts.append(
            f"<p><b>Strongest relation:</b> <code>{esc(best['best_predictor'])}</code> → "
            f"<code>{esc(best['label'])}</code>, Spearman ρ = <b>{num(best['rho'])}</b> "
            f"{ci(best['rho_lo'], best['rho_hi'])} over {esc(h.get('n_labelled'))} labelled "
            "features (Duan's Table 2: |ρ| 0.35–0.47).</p>")
    br = h.get("best_residualised")
    if br:
        parts.append(
            f"<p><b>Controlling for</b> effect size, effect CV, natural activation and "
            f"frequency: <code>{esc(br['best_predictor'])}</code> → <code>{esc(br['label'])}"
            f"</code>, partial Spearman ρ = <b>{num(br['rho'])}</b> "
            f"{ci(br['rho_lo'], br['rho_hi'])} (the replication's partial ρ for crowding vs "
            "downstream count: +0.48 GPT-2, +0.24 Gemma, +0.15 Llama, ≈0 Pythia).</p>")
    fb = h.get("full_beats_freq") or {}
    vc = h.get("verdict_counts") or {}
    parts.append(
        f"<p><b>Full predictor set vs baselines:</b> <code>{esc(h.get('full_set'))}</code> has a "
        f"higher cross-validated Spearman than <code>freq_only</code> on {fb.get('labels', 0)} of "
        f"{fb.get('of', 0)} labels. Verdicts: <span class=robust>{vc.get('robust', 0)} robust"
        f"</span>, <span class=weak>{vc.get('weak', 0)} weak</span>, "
        f"<span class=none>{vc.get('none', 0)} none</span>.</p>")
    ho = h.get("heldout")
    if ho:
        if ho.get("outcome") == "skipped":
            parts.append(f"<p><b>Held-out screening:</b> skipped — {esc(ho.get('skipped'))}.</p>")
        else:
            parts.append(
                f"<p><b>Held-out screening</b> ({esc(ho.get('n_per_group'))} features per group, "
                f"{esc(ho.get('contexts'))} contexts, <code>{esc(ho.get('predictor_set'))}</code> "
                f"predictors): <span class=\"{esc(ho.get('outcome'))}\">"
                f"{esc(ho.get('outcome'))}</span>. Predicted-clean vs predicted-messy: stability "
                f"{num(ho.get('predicted_clean_stability_abs'))} vs "
                f"{num(ho.get('predicted_messy_stability_abs'))} (p = "
                f"{pval(ho.get('p_stability'))}); collateral per effect "
                f"{num(ho.get('predicted_clean_collateral_per_effect'))} vs "
                f"{num(ho.get('predicted_messy_collateral_per_effect'))} (p = "
                f"{pval(ho.get('p_collateral'))}).</p>")
    sc = h.get("screen")
    if sc:
        tiers = sc.get("tiers") or {}
        parts.append(
            f"<p><b>Screen:</b> all {esc(sc.get('n_features'))} features ranked by predicted clean "
            f"score ({esc(sc.get('model'))} on <code>{esc(sc.get('predictor_set'))}</code>); "
            f"{num(100 * (sc.get('level') or 0), 0)} % split-conformal intervals with measured "
            f"coverage <b>{num(sc.get('coverage'))}</b>. Tiers: {tiers.get('clean', 0)} clean, "
            f"{tiers.get('uncertain', 0)} uncertain, {tiers.get('messy', 0)} messy.</p>")
    rows = []
    for r in h.get("labels", []):
        v = r.get("verdict") or "none"
        rows.append([
            f"<code>{esc(r['label'])}</code>", f"<code>{esc(r.get('best_predictor'))}</code>",
            f"{num(r.get('rho'))} {ci(r.get('rho_lo'), r.get('rho_hi'))}",
            num(r.get("full_cv_spearman")),
            f"{num(r.get('gain_vs_freq_only'))} "
            f"{ci(r.get('gain_vs_freq_only_lo'), r.get('gain_vs_freq_only_hi'))}",
            f"{num(r.get('gain_vs_activation_magnitude_only'))} "
            f"{ci(r.get('gain_vs_activation_magnitude_only_lo'), r.get('gain_vs_activation_magnitude_only_hi'))}",  # noqa: E501
            num(r.get("resid_full_cv_spearman")),
            f'<span class="{esc(v)}">{esc(v)}</span>',
        ])
    tab = table(["label", "best predictor", "ρ [95 % CI]", "full-set CV ρ",
                 "gain vs freq_only", "gain vs act. magnitude", "residualised CV ρ",
                 "verdict"], rows, left=2)
    return ('<section class="headline" id="headline"><h2 style="margin-top:0;border:0">'
            "Headline</h2>" + "".join(parts) + tab + "</section>")


def predictive_section(data: ReportData) -> str:
    ev = data.evaluation
    out = ["<h2>Predictive evaluation</h2>"]
    univ = pd.DataFrame(ev.get("univariate") or [])
    if len(univ):
        out.append(fig(figures.heatmap(univ, ev.get("targets")),
                       "Spearman ρ of every predictor with every label (bootstrap 95 % CIs; "
                       "• marks CIs that exclude zero)."))
    best = (ev.get("headline") or {}).get("best")
    lab = data.labelled
    if best and lab is not None and best.get("best_predictor") in lab.columns \
            and best.get("label") in lab.columns:
        out.append(fig(figures.scatter(
            lab[best["best_predictor"]], lab[best["label"]], best["best_predictor"],
            best["label"], f"ρ = {num(best['rho'])} {ci(best['rho_lo'], best['rho_hi'])}"),
            "The strongest predictor against its label, one point per labelled feature."))
    cv = pd.DataFrame(ev.get("cv") or [])
    if len(cv):
        sets = ["freq_only", "activation_magnitude_only", "geometry", "full_no_magnitude",
                "full_all"]
        out.append(fig(figures.cv_bars(cv, sets, ev.get("targets")),
                       "Cross-validated Spearman (ridge, 5-fold, seed 0) per label: the baselines "
                       "(grey) against geometry and the full sets, with bootstrap 95 % CIs."))
        g = cv[(cv["model"] == "gbm")] if "model" in cv.columns else cv.iloc[:0]
        if "residualised" in g.columns:
            g = g[~g["residualised"].astype(bool)]
        if len(g):
            rows = [[f"<code>{esc(r['label'])}</code>", f"<code>{esc(r['set'])}</code>",
                     f"{num(r['cv_spearman'])} {ci(r['cv_spearman_lo'], r['cv_spearman_hi'])}",
                     num(r["r2"]), num(r["mae"], 3)] for r in g.to_dict("records")]
            out.append("<details><summary>Gradient boosting (max depth 2, 100 trees)</summary>"
                       + table(["label", "set", "CV ρ", "R²", "MAE"], rows, left=2)
                       + "</details>")
    nuis = ev.get("nuisance") or []
    out.append(f'<p class="meta">Residualisation (on ranks: partial Spearman) nuisance set: '
               f'{", ".join(map(esc, nuis))}. '
               "Verdict (Duan): robust = best |ρ| ≥ 0.25, full-set gain over freq_only ≥ 0.05 and "
               "over activation magnitude ≥ 0; weak = best |ρ| ≥ 0.20 and gain over freq_only ≥ 0."
               "</p>")
    skipped = ev.get("skipped_labels") or {}
    if skipped:
        out.append('<p class="meta">Labels not evaluated: ' + "; ".join(
            f"{esc(k)} ({esc(v)})" for k, v in skipped.items()) + "</p>")
    return "".join(out)


def heldout_section(ev: Mapping[str, Any]) -> str:
    ho = ev.get("heldout")
    if not ho:
        return ""
    s = ho.get("summary", {})
    out = ["<h2>Held-out screening</h2>"]
    if s.get("outcome") == "skipped":
        return out[0] + f"<p>Skipped: {esc(s.get('skipped'))}.</p>"
    out.append(
        f"<p>Trained on {esc(s.get('n_train'))} features, screened a pool of "
        f"{esc(s.get('n_pool'))} ({esc(s.get('n_candidates'))} after effect matching); on the "
        f"pool, ρ(predicted, measured clean score) = {num(s.get('pool_spearman'))} "
        f"{ci(s.get('pool_spearman_lo'), s.get('pool_spearman_hi'))}. Groups were then measured "
        f"on <b>{esc(s.get('contexts'))}</b> contexts.</p>")
    feats = pd.DataFrame(ho.get("features") or [])
    if len(feats):
        out.append(fig(figures.heldout_boxes(
            feats, ["stability_abs", "collateral_per_effect", "effect_l2", "kl_per_effect"]),
            "Labels measured on new contexts for the predicted-clean, random and predicted-messy "
            "groups."))
    tests = pd.DataFrame(ho.get("tests") or [])
    if len(tests):
        rows = [[f"<code>{esc(r['metric'])}</code>",
                 esc(f"{r['group_a']} vs {r['group_b']}".replace("predicted_", "")),
                 f"{num(r['mean_a'], 3)} vs {num(r['mean_b'], 3)}", pval(r["p"])]
                for r in tests.to_dict("records")]
        out.append("<details><summary>Mann–Whitney U tests (two-sided)</summary>"
                   + table(["metric", "groups", "means", "p"], rows, left=2) + "</details>")
    return "".join(out)


def screen_section(data: ReportData) -> str:
    sc = data.evaluation.get("screen")
    t = data.screen
    if not sc or t is None or not len(t):
        return ""
    cov = sc.get("coverage") or {}
    out = ["<h2>Every feature, screened</h2>",
           f"<p>{esc(sc.get('n_features'))} features; model {esc(sc.get('model'))} on "
           f"<code>{esc(sc.get('predictor_set'))}</code> (CV ρ on the clean score "
           f"{num(sc.get('cv_spearman'))}). Intervals: split-conformal at "
           f"{num(100 * (sc.get('level') or 0), 0)} % (half-width {num(sc.get('halfwidth'))}); "
           f"measured coverage on held-out labelled features {num(cov.get('measured'))} ± "
           f"{num(cov.get('std'))} over {esc(cov.get('repeats'))} random splits. Tier clean / "
           "messy = the whole interval above / below the labelled median clean score "
           f"({num(sc.get('median_clean_score'))}); features outside the labelling domain are "
           "always uncertain.</p>",
           fig(figures.screen_overview(t, sc.get("median_clean_score")),
               "Predicted clean score of every feature with its interval; black: measured.")]
    cols = ["rank", "feature", "tier", "pred_clean_score", "pred_lo", "pred_hi",
            "measured_clean_score", "measured_stability_abs", "measured_collateral_per_effect"]
    cols = [c for c in cols if c in t.columns]
    show = pd.concat([t.head(25), t.tail(10)])
    rows = []
    for r in show.to_dict("records"):
        rows.append([esc(r["rank"]), esc(r["feature"]),
                     f'<span class="tier tier-{esc(r["tier"])}">{esc(r["tier"])}</span>',
                     *[num(r[c]) for c in cols[3:]]])
    out.append("<details open><summary>Top 25 and bottom 10 of the ranking</summary>"
               + table([esc(c) for c in cols], rows, left=0) + "</details>")
    return "".join(out)


def card_html(c: FeatureCard) -> str:
    head = (f'<h3>#{c.rank} · feature {c.feature} <span class="tier tier-{esc(c.tier)}">'
            f"{esc(c.tier)}</span></h3>"
            f"<div>predicted clean score <b>{num(c.pred)}</b> {ci(c.lo, c.hi)}</div>")
    first = ("clean_score", "stability_abs", "collateral_per_effect", "effect_l2")
    keys = [k for k in dict.fromkeys([*first, *c.predicted, *c.measured])
            if _shown(c.predicted.get(k)) or _shown(c.measured.get(k))]
    lab = ""
    if keys:
        lab = table(["label", "pred.", "meas."],
                    [[f"<code>{esc(k)}</code>", num(c.predicted.get(k), 3),
                      num(c.measured.get(k), 3)] for k in keys])
    lens = ""
    if c.logit_lens:
        lens = "<div><b>promotes</b> " + "".join(
            f'<span class="tok">{esc(t)}</span>' for t in c.logit_lens[:10]) + "</div>"
    snips = ""
    if c.snippets:
        snips = "<div><b>fires on</b>" + "".join(
            f'<div class="snip">…{esc(s.before)}<mark>{esc(s.token)}</mark>{esc(s.after)}… '
            f"({num(s.activation)})</div>" for s in c.snippets) + "</div>"
    gen = ""
    if c.steered is not None:
        s = c.steered
        gen = (f"<div><b>steered: {esc(s.how)}</b>"
               f'<div class="gen"><b>prompt</b> {esc(s.prompt)}</div>'
               f'<div class="gen"><b>clean</b> {esc(s.clean)}</div>'
               f'<div class="gen"><b>steered</b> {esc(s.steered)}</div></div>')
    return f'<div class="card">{head}{lens}{snips}{lab}{gen}</div>'


def _shown(x: Any) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def cards_section(cards: Sequence[FeatureCard]) -> str:
    if not cards:
        return ""
    return ("<h2>Feature cards</h2><p class=meta>The predicted cleanest features first, then the "
            "messiest; logit-lens tokens, top-activating corpus contexts, predicted vs measured "
            "labels, and one steered continuation.</p><div class=cards>"
            + "".join(card_html(c) for c in cards) + "</div>")


def run_section(run: Mapping[str, Any], settings: Mapping[str, Any] | None) -> str:
    items = [f"<tr><td class=l>{esc(k)}</td><td class=l>{esc(v)}</td></tr>"
             for k, v in run.items() if not isinstance(v, dict | list)]
    if settings:
        items += [f"<tr><td class=l>evaluation: {esc(k)}</td><td class=l>{esc(v)}</td></tr>"
                  for k, v in settings.items()]
    return ("<h2>Run</h2><details><summary>Settings and provenance</summary><table><tbody>"
            + "".join(items) + "</tbody></table></details>")


def render_report(data: ReportData) -> str:
    """The report as one HTML string (figures embedded as data URIs, no scripts)."""
    ev = data.evaluation
    run = data.run
    meta = " · ".join(esc(f"{k}: {run[k]}") for k in ("model", "sae", "downstream_sae")
                      if run.get(k))
    body = [
        f"<h1>{esc(data.title)}</h1><div class=meta>{meta}</div>",
        headline_section(ev.get("headline") or {}),
        predictive_section(data),
        heldout_section(ev),
        screen_section(data),
        cards_section(data.cards),
        run_section(run, ev.get("settings")),
    ]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            '<link rel=icon href="data:,">'
            f"<title>{esc(data.title)}</title><style>{CSS}</style></head><body><main>"
            + "".join(body) + "</main></body></html>")
