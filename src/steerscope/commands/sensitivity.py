"""``steerscope sensitivity`` and ``steerscope bench sensitivity``: thin shells over the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from steerscope.errors import SteerscopeError

# Same as steerscope.cli.ModelOpt; repeated here because typer resolves annotations in this
# module's globals and importing steerscope.cli at import time would be circular.
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="HF model dir or Hub id (default: TinyStories-656K)")
]


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise SteerscopeError(
            f"{what} '{text}' is not a comma-separated list of numbers", "pass e.g. 0.1,0.2,0.5"
        ) from None


def _shrinkage(text: str | None) -> float | str | None:
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise SteerscopeError(
            f"shrinkage '{text}' is neither 'auto' nor a number", "pass auto or e.g. 0.1"
        ) from None


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add the ``sensitivity`` verb and the ``bench sensitivity`` benchmark."""
    from steerscope.cli import _quiet_hf, console, friendly, progress_bar

    @app.command("sensitivity")
    @friendly
    def sensitivity_cmd(
        out: Annotated[Path, typer.Option(help="directory for sensitivity.parquet/.html/.json")],
        model: ModelOpt = None,
        site: Annotated[str, typer.Option(help="perturbed hook site")] = "blocks.0.hook_resid_post",
        corpus: Annotated[str, typer.Option(help="text file (or shared corpus name)")] = (
            "tinystories-train.txt"),
        sae: Annotated[list[str] | None, typer.Option(
            help="SAE(s) at the site (default: every embedded SAE there); repeatable")] = None,
        lengths: Annotated[str | None, typer.Option(
            help="comma-separated perturbation lengths (default: 0.02…1.0 × median norm)")] = None,
        unit: Annotated[str, typer.Option(help="relative (× median norm) | absolute")] = (
            "relative"),
        positions: Annotated[str, typer.Option(help="all | last | both")] = "all",
        runs: Annotated[int, typer.Option(help="independent direction draws per family")] = 2,
        contexts: Annotated[int, typer.Option(help="perturbed contexts")] = 32,
        stats_contexts: Annotated[int, typer.Option(help="contexts for μ, Σ, median norm")] = 256,
        context_length: Annotated[int, typer.Option(help="tokens per context (BOS incl.)")] = 64,
        shrinkage: Annotated[str | None, typer.Option(
            help="covariance shrinkage: auto (Ledoit–Wolf) or a weight in (0, 1]")] = None,
        no_sae: Annotated[bool, typer.Option("--no-sae", help="baselines only")] = False,
        seed: Annotated[int, typer.Option()] = 0,
        threads: Annotated[int, typer.Option(
            help="torch CPU threads (0: one for a small model, else torch's default)")] = 0,
    ) -> None:
        """KL vs perturbation length for baseline, SAE-feature and SAE-error directions."""
        _quiet_hf()
        from steerscope.sensitivity.pipeline import run_default
        from steerscope.sensitivity.sweep import DEFAULT_LENGTHS, SensitivityConfig

        pos = {"all": ("all",), "last": ("last",), "both": ("all", "last")}.get(positions)
        if pos is None:
            raise SteerscopeError(f"unknown position policy '{positions}'", "use all, last or both")
        cfg = SensitivityConfig(
            lengths=_floats(lengths, "lengths") if lengths is not None else DEFAULT_LENGTHS,
            unit=unit, positions=pos, runs=runs, seed=seed, shrinkage=_shrinkage(shrinkage),
            sae_families=() if no_sae else SensitivityConfig.sae_families,
            substitutions=() if no_sae else SensitivityConfig.substitutions,
        )
        with progress_bar() as bar:
            task = bar.add_task("sweeping", total=None)
            paths = run_default(
                out, model=model, site=site, corpus=corpus, saes=[] if no_sae else (sae or None),
                n_contexts=contexts,
                stats_contexts=stats_contexts, context_length=context_length, config=cfg,
                progress=lambda i, n: bar.update(task, completed=i, total=n),
                threads=threads or None,
            )
        for p in paths.values():
            console.print(f"wrote {p}")

    @bench_app.command("sensitivity")
    @friendly
    def bench_sensitivity_cmd(
        json_path: Annotated[Path, typer.Option("--json", help="write the result here")],
        model: ModelOpt = None,
        contexts: Annotated[int, typer.Option()] = 32,
        directions: Annotated[int, typer.Option()] = 4,
        all_positions: Annotated[bool, typer.Option(help="also time the all-position mode")] = (
            True),
        threads: Annotated[int, typer.Option(
            help="torch CPU threads (0: one for a small model, else torch's default)")] = 0,
        repeats: Annotated[int, typer.Option(help="alternating timed runs per side (min)")] = 2,
    ) -> None:
        """Last-position replay and all-position sweeps vs the per-direction forward loop."""
        _quiet_hf()
        from steerscope.benchmarks.sensitivity import bench_sensitivity
        from steerscope.store import write_json

        result = bench_sensitivity(model, n_contexts=contexts, n_directions=directions,
                                   all_positions=all_positions, threads=threads or None,
                                   repeats=repeats)
        write_json(result, json_path)
        print(json.dumps(result, indent=2))
