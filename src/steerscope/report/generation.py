"""The generation report (``generation.html``): the filter curves of one or several
``generate-eval`` runs, rendered from their ``filter.json`` and ``generation.parquet``.

Like the screen report it never computes: every number comes from the result dictionaries
:func:`steerscope.filtering.run_generation_eval` produced.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steerscope.errors import SteerscopeError
from steerscope.filtering import _f, arch_name


def _panel(ax: Any, result: dict[str, Any], key: str, xlabel: str, logx: bool) -> None:
    rows = [r for r in result[key] if r["mean"] is not None]
    title = f"{arch_name(result['architecture'])} · {result['hook']}"
    if not rows:
        ax.set_title(f"{title}: no feature passes", fontsize=9)
        return
    xs = [r["quantile"] if key == "clean_score" else r["threshold"] for r in rows]
    m = np.array([r["mean"] for r in rows])
    lo = np.array([r["ci_lo"] for r in rows])
    hi = np.array([r["ci_hi"] for r in rows])
    ax.fill_between(xs, [r["random_lo"] for r in rows], [r["random_hi"] for r in rows],
                    color="0.85", label="random subsets of the same size (95%)")
    ax.axhline(result["mean_unsteered"], color="0.4", ls=":", lw=1,
               label="unsteered generations")
    ax.errorbar(xs, m, yerr=[m - lo, hi - m], marker="o", ms=4, color="#c2188b", capsize=2,
                label="filtered features (bootstrap 95% CI)")
    for x, y, r in zip(xs, m, rows, strict=True):
        ax.annotate(str(r["n"]), (x, y), textcoords="offset points", xytext=(0, 6), fontsize=6,
                    ha="center")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean GenSuccess@20, held-out prefixes")
    ax.set_title(title if key == "output_score" else f"{title} ({key})", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")


def _fixed_panel(ax: Any, result: dict[str, Any]) -> None:
    curves = result.get("fixed_strength") or []
    if not curves:
        ax.set_axis_off()
        return
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for i, c in enumerate(curves):
        rows = [r for r in c["curve"] if r["mean"] is not None]
        ax.plot([r["threshold"] for r in rows], [r["mean"] for r in rows], marker=".", ms=3,
                color=cmap(i / max(1, len(curves) - 1)), label=f"s = {c['strength']:g}")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("output score threshold θ")
    ax.set_ylabel("mean GenSuccess@20 at a fixed strength")
    ax.set_title(f"{arch_name(result['architecture'])}: each strength, no selection", fontsize=9)
    ax.legend(fontsize=5, ncol=3, loc="lower left")


def filter_figure(results: Sequence[dict[str, Any]]) -> str:
    """The filter curve(s) as a PNG data URI: one column per SAE, one row per filter.

    Drawn on a bare matplotlib ``Figure`` (no pyplot state), like :mod:`steerscope.report`."""
    from matplotlib.figure import Figure

    from steerscope.report.figures import to_data_uri

    kinds = [("output_score", "output score threshold θ", True)]
    if any("clean_score" in r for r in results):
        kinds += [("clean_score", "predicted clean score quantile", False),
                  ("both", "θ, and predicted clean score ≥ its median", True)]
    fixed = any(r.get("fixed_strength") for r in results)
    rows = len(kinds) + int(fixed)
    fig = Figure(figsize=(4.6 * len(results), 3.6 * rows))
    axes = fig.subplots(rows, len(results), squeeze=False)
    for j, res in enumerate(results):
        for i, (key, xlabel, logx) in enumerate(kinds):
            if key in res:
                _panel(axes[i][j], res, key, xlabel, logx)
            else:
                axes[i][j].set_axis_off()
        if fixed:
            _fixed_panel(axes[rows - 1][j], res)
    fig.tight_layout()
    return to_data_uri(fig)


def _table(result: dict[str, Any]) -> str:
    head = ("<tr><th>θ</th><th>n</th><th>mean GS@20 [95% CI]</th><th>random, same size [95%]</th>"
            "<th>× unfiltered [95% CI]</th><th>p (random ≥)</th></tr>")
    body = []
    for r in result["output_score"]:
        if r["mean"] is None:
            body.append(f"<tr><td>{r['threshold']:g}</td><td>0</td><td colspan=4>—</td></tr>")
            continue
        body.append(
            f"<tr><td>{r['threshold']:g}</td><td>{r['n']}</td>"
            f"<td>{r['mean']:.3f} [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]</td>"
            f"<td>{r['random_mean']:.3f} [{r['random_lo']:.3f}, {r['random_hi']:.3f}]</td>"
            f"<td>{_f(r['ratio'], '.2f')} [{_f(r['ratio_lo'], '.2f')}, "
            f"{_f(r['ratio_hi'], '.2f')}]</td>"
            f"<td>{r['p_random']:.3g}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _examples(examples: pd.DataFrame | None) -> str:
    if examples is None or not len(examples):
        return ""
    items = "".join(
        f"<tr><td>{int(r.feature)}</td><td>{r.strength:g}</td><td>{r.output_score:.3g}</td>"
        f"<td>{r.gen_success:.2f}</td><td>{html.escape(str(r.example))}</td></tr>"
        for r in examples.itertuples()
    )
    return ("<h4>Examples: held-out prefixes, chosen strength, highest output scores</h4>"
            "<table><tr><th>feature</th><th>strength</th><th>S_out</th><th>GS@20</th>"
            f"<th>first generation</th></tr>{items}</table>")


def _summary(result: dict[str, Any]) -> str:
    strengths = ", ".join(f"{k}: {v}" for k, v in result["chosen_strengths"].items())
    return (
        f"<p>{html.escape(result['note'])}</p>"
        f"<p>{result['n_features']} features; strength chosen per feature by Arad's rule on "
        f"{result['n_prefixes']['select']} prefixes, everything reported on the other "
        f"{result['n_prefixes']['report']}; unsteered mean GenSuccess@20 "
        f"{result['mean_unsteered']:.3f}; chosen strengths {html.escape(strengths)}; output "
        f"scores: {html.escape(result['output_score_source'])}.</p>"
    )


def report_section(
    results: dict[str, Any] | Sequence[dict[str, Any]],
    examples: Sequence[pd.DataFrame | None] | None = None,
) -> str:
    """The report section (HTML fragment): the filter curves side by side for one or more SAEs,
    each SAE's verdict, table and example generations."""
    results = [results] if isinstance(results, dict) else list(results)
    examples = list(examples) if examples is not None else [None] * len(results)
    parts = [
        "<section id='generation'><h2>Steered generation and the output-score filter "
        "(Arad et al.)</h2>",
        "<p>Does keeping only features with a high output score S<sub>out</sub> make steering "
        "succeed more often? GenSuccess@20 counts generated tokens that lie in the feature's "
        "logit-lens top-20 set. Arad et al. report 2–3× on Gemma-2 (0.5–0.6 unfiltered → "
        "1.1–1.4 at θ = 0.9).</p>",
        f"<img alt='filter curves' src='{filter_figure(results)}'/>",
    ]
    for res, ex in zip(results, examples, strict=True):
        parts.append(f"<h3>{html.escape(arch_name(res['architecture']))} — "
                     f"{html.escape(res['sae'])}</h3>")
        parts.append(_summary(res) + _table(res) + _examples(ex))
    parts.append("</section>")
    return "".join(parts)


def _page(section: str) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>steerscope — steered "
            "generation</title><style>body{font-family:sans-serif;max-width:1400px;margin:auto}"
            "img{max-width:100%;height:auto}"
            "table{border-collapse:collapse;font-size:12px;margin:6px 0}td,th{border:1px solid "
            f"#ccc;padding:2px 6px}}</style></head><body>{section}</body></html>\n")


def _example_rows(table: pd.DataFrame) -> pd.DataFrame:
    rep = table[(table["split"] == "report") & table["selected"]]
    return rep.sort_values("output_score", ascending=False).head(8)


def write_outputs(
    out: str | Path,
    table: pd.DataFrame,
    per_feature: pd.DataFrame,
    result: dict[str, Any],
    manifest: dict[str, Any],
) -> list[Path]:
    """``generation.parquet``, ``filter.json`` (with the manifest) and ``generation.html``, each
    written atomically: a killed run never leaves a half-written file behind."""
    from steerscope.store import atomic_path, write_json, write_parquet

    out = Path(out)
    paths = [write_parquet(table, out / "generation.parquet")]
    result = {**result, "per_feature": per_feature.to_dict(orient="records"),
              "manifest": manifest}
    paths.append(write_json(result, out / "filter.json"))
    with atomic_path(out / "generation.html") as tmp:
        tmp.write_text(_page(report_section(result, [_example_rows(table)])), encoding="utf-8")
    paths.append(out / "generation.html")
    return paths


def write_combined_report(out: str | Path, run_dirs: Sequence[str | Path]) -> Path:
    """One ``generation.html`` with the curves of several runs (e.g. ReLU, JumpReLU, TopK side
    by side), rendered from their ``filter.json`` and ``generation.parquet`` only."""
    import json

    from steerscope.store import atomic_path, read_parquet

    results, examples = [], []
    for d in run_dirs:
        path = Path(d) / "filter.json"
        if not path.is_file():
            raise SteerscopeError(f"'{path}' does not exist", "run generate-eval there first")
        results.append(json.loads(path.read_text(encoding="utf-8")))
        examples.append(_example_rows(read_parquet(Path(d) / "generation.parquet")))
    target = Path(out) / "generation.html"
    with atomic_path(target) as tmp:
        tmp.write_text(_page(report_section(results, examples)), encoding="utf-8")
    return target
