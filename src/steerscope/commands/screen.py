"""``steerscope screen``: the main job, predictors → labels → evaluation → report.

A thin shell over :func:`steerscope.pipeline.run_screen`: parse options, draw progress, print the
headline and where the report is. Bad input is a SteerscopeError from the library, printed as one
line by :func:`steerscope.cli.friendly` (exit code 2).

No ``from __future__ import annotations`` here: typer reads the option annotations at
registration time.
"""

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer


def _band(text: str) -> tuple[float, float]:
    from steerscope.errors import SteerscopeError

    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise SteerscopeError(f"--freq-band '{text}' is not two numbers",
                              "write e.g. 0.002,0.5") from None
    return lo, hi


def _alpha(text: str) -> Any:
    from steerscope.labels import parse_alphas

    return parse_alphas(text)


def _fmt(x: Any, d: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{d}f}" if isinstance(x, float) and d == 2 and x < 0 else f"{x:.{d}f}"


def print_headline(console: Any, h: dict, title: str) -> None:
    """The headline as a rich table plus one line each for held-out screening and the screen."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("label", "best predictor", "ρ [95 % CI]", "full CV ρ", "gain vs freq [CI]",
                "gain vs act-mag [CI]", "verdict"):
        left = col in ("label", "best predictor", "verdict")
        t.add_column(col, justify="left" if left else "right", no_wrap=True)
    colour = {"robust": "green", "weak": "yellow", "none": "dim"}
    for r in h.get("labels", []):
        v = r.get("verdict") or "none"
        t.add_row(
            r["label"], str(r.get("best_predictor")),
            f"{_fmt(r.get('rho'))} [{_fmt(r.get('rho_lo'))}, {_fmt(r.get('rho_hi'))}]",
            _fmt(r.get("full_cv_spearman")),
            f"{_fmt(r.get('gain_vs_freq_only'))} [{_fmt(r.get('gain_vs_freq_only_lo'))}, "
            f"{_fmt(r.get('gain_vs_freq_only_hi'))}]",
            f"{_fmt(r.get('gain_vs_activation_magnitude_only'))} "
            f"[{_fmt(r.get('gain_vs_activation_magnitude_only_lo'))}, "
            f"{_fmt(r.get('gain_vs_activation_magnitude_only_hi'))}]",
            f"[{colour.get(v, 'white')}]{v}[/]",
        )
    console.print(t)
    best = h.get("best")
    if best:
        console.print(f"strongest (Table 2 labels): [bold]{best['best_predictor']}[/] → "
                      f"{best['label']}  ρ = {_fmt(best['rho'])} [{_fmt(best['rho_lo'])}, "
                      f"{_fmt(best['rho_hi'])}]  (Duan Table 2: |ρ| 0.35–0.47)", highlight=False)
    br = h.get("best_residualised")
    if br:
        console.print(f"controlling for effect, activation, frequency: {br['best_predictor']} → "
                      f"{br['label']}  partial ρ = "
                      f"{_fmt(br['rho'])} [{_fmt(br['rho_lo'])}, {_fmt(br['rho_hi'])}]",
                      highlight=False)
    fb = h.get("full_beats_freq") or {}
    console.print(f"{h.get('full_set')} beats freq_only on {fb.get('labels', 0)}/"
                  f"{fb.get('of', 0)} labels (ridge CV Spearman)", highlight=False)
    ho = h.get("heldout") or {}
    if ho.get("outcome") == "skipped":
        console.print(f"held-out screening: skipped ({ho.get('skipped')})", highlight=False)
    elif ho:
        console.print(
            f"held-out screening: [bold]{ho.get('outcome')}[/] ({ho.get('n_per_group')} per "
            f"group, {ho.get('contexts')} contexts) — stability clean "
            f"{_fmt(ho.get('predicted_clean_stability_abs'), 3)} vs messy "
            f"{_fmt(ho.get('predicted_messy_stability_abs'), 3)} (p={_p(ho.get('p_stability'))}); "
            f"collateral/effect clean {_fmt(ho.get('predicted_clean_collateral_per_effect'), 3)} "
            f"vs messy {_fmt(ho.get('predicted_messy_collateral_per_effect'), 3)} "
            f"(p={_p(ho.get('p_collateral'))})", highlight=False)
    sc = h.get("screen") or {}
    if sc:
        tiers = sc.get("tiers") or {}
        console.print(
            f"screen: {sc.get('n_features')} features, {sc.get('model')} on "
            f"{sc.get('predictor_set')}; {round(100 * (sc.get('level') or 0))} % conformal "
            f"intervals, measured coverage {_fmt(sc.get('coverage'))}; tiers "
            f"{tiers.get('clean', 0)} clean / {tiers.get('uncertain', 0)} uncertain / "
            f"{tiers.get('messy', 0)} messy", highlight=False)


def _p(p: Any) -> str:
    if p is None or not isinstance(p, float) or not math.isfinite(p):
        return "—"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def register(app: typer.Typer, bench_app: typer.Typer) -> None:  # noqa: ARG001 - no benchmark
    """Add ``screen`` to the main app."""
    from steerscope.cli import ModelOpt, _quiet_hf, console, friendly, progress_bar

    @app.command("screen")
    @friendly
    def screen(
        out: Annotated[Path, typer.Option(help="run directory (resumable: rerun to continue)")],
        sae: Annotated[str, typer.Option(
            help="embedded SAE name, SAELens directory, or release:sae_id")
        ] = "relu-blocks.0.hook_resid_post",
        downstream_sae: Annotated[str | None, typer.Option(
            help="SAE at a later site for collateral (default: the same embedded architecture "
                 "one block later)")] = None,
        all_embedded: Annotated[bool, typer.Option(
            "--all-embedded", help="run the ReLU, JumpReLU and TopK embedded SAEs, each into "
                                   "OUT/<sae>/")] = False,
        model: ModelOpt = None,
        n_labelled: Annotated[int, typer.Option(
            help="features to label (evenly spaced through the eligible frequency band)")
        ] = 600,
        alpha: Annotated[str, typer.Option(
            help="steering strength on the raw decoder row (Duan: 1), or 'auto'")] = "1",
        corpus: Annotated[str, typer.Option(help="corpus for predictors and labels")
                          ] = "tinystories-train.txt",
        heldout_corpus: Annotated[str, typer.Option(
            help="corpus of NEW contexts for the held-out test")] = "tinystories-valid.txt",
        freq_band: Annotated[str, typer.Option(
            help="final-token firing band of eligible features")] = "0.002,0.5",
        n_boot: Annotated[int, typer.Option(help="bootstrap resamples for CIs")] = 1000,
        seed: Annotated[int, typer.Option()] = 0,
        predictors: Annotated[str | None, typer.Option(
            help="use this predictors.parquet instead of computing it")] = None,
        labels: Annotated[str | None, typer.Option(
            help="use this labels.parquet instead of computing it")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the headline as JSON")
                           ] = False,
    ) -> None:
        """Predict steering side effects for every feature, evaluate the prediction, and write
        an HTML report (the main job)."""
        _quiet_hf()
        from steerscope.pipeline import ScreenConfig, run_all_embedded, run_screen

        cfg = ScreenConfig(
            sae=sae, downstream_sae=downstream_sae, model=model, n_labelled=n_labelled,
            alpha=_alpha(alpha), corpus=corpus, heldout_corpus=heldout_corpus,
            freq_band=_band(freq_band), n_boot=n_boot, seed=seed, predictors=predictors,
            labels=labels,
        )
        with progress_bar() as bar:
            task = bar.add_task("starting", total=100)

            def show(what: str, frac: float) -> None:
                bar.update(task, description=what, completed=round(100 * frac))

            runs = (run_all_embedded(out, cfg, show) if all_embedded
                    else [run_screen(out, cfg, show)])
        if as_json:
            print(json.dumps({str(r.out): r.headline for r in runs}, indent=2))
            return
        # a log or pipe has no terminal width to respect: do not fold the table into 80 columns
        from rich.console import Console

        wide = console if console.is_terminal else Console(width=160)
        for r in runs:
            name = r.out.name if all_embedded else cfg.sae
            total = sum(r.seconds.values())
            print_headline(wide, r.headline, f"steerscope screen — {name}")
            reused = f", reused: {', '.join(r.reused)}" if r.reused else ""
            wide.print(f"report: [bold]{r.report}[/]  ({total:.0f} s{reused})",
                          highlight=False)
