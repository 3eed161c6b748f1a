"""``steerscope predictors`` and ``steerscope bench predictors|output-scores``: thin shells."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

# Same as steerscope.cli.ModelOpt; repeated because importing steerscope.cli here is circular.
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="HF model dir or Hub id (default: TinyStories-656K)")
]
SaeOpt = Annotated[
    str, typer.Option("--sae", help="embedded SAE name, SAELens directory, or release:sae_id")
]
JsonOpt = Annotated[Path, typer.Option("--json", help="write the result here")]
RepeatsOpt = Annotated[int, typer.Option(help="interleaved timing repeats")]
DEFAULT_SAE = "relu-blocks.0.hook_resid_post"


def _report(result: dict, json_path: Path) -> None:
    """Write a benchmark result to ``json_path`` and show it."""
    from steerscope.store import write_json

    write_json(result, json_path)
    print(json.dumps(result, indent=2))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add the ``predictors`` verb and the two predictor benchmarks."""
    from steerscope.cli import _quiet_hf, console, friendly, progress_bar

    @app.command("predictors")
    @friendly
    def predictors_cmd(
        out: Annotated[Path, typer.Option(help="directory for predictors.parquet + manifest")],
        sae: SaeOpt = DEFAULT_SAE,
        model: ModelOpt = None,
        corpus: Annotated[str, typer.Option(help="text file (or shared corpus name)")] = (
            "tinystories-train.txt"),
        context_length: Annotated[int, typer.Option(help="tokens per context (BOS incl.)")] = 64,
        max_contexts: Annotated[int | None, typer.Option(help="use at most this many")] = None,
        threshold: Annotated[float, typer.Option(help="firing threshold")] = 1e-6,
        panel_size: Annotated[int, typer.Option(help="co-activation panel size")] = 2048,
        coact_positions: Annotated[int, typer.Option(
            help="count co-activation on every k-th context, enough for this many positions "
                 "(0 = all)")] = 98304,
        input_min_contexts: Annotated[int, typer.Option(
            help="input score needs this many firing contexts (paper 20, code 10)")] = 20,
        input_max_contexts: Annotated[int, typer.Option(help="top contexts per feature")] = 100,
        prompt: Annotated[str, typer.Option(help="neutral prompt of the output score")] = (
            "From my experience,"),
        factor: Annotated[float, typer.Option(help="output-score amplification")] = 10.0,
        output_scores: Annotated[bool, typer.Option(help="compute output scores")] = True,
        include_bos: Annotated[bool, typer.Option(
            help="count the BOS position in the statistics")] = False,
        skip_nonfinite: Annotated[bool, typer.Option(
            help="drop contexts with NaN/inf activations instead of stopping")] = False,
    ) -> None:
        """Pre-intervention predictors, input and output scores for every feature of an SAE."""
        _quiet_hf()
        from steerscope.predictors import PredictorConfig, run_predictors

        cfg = PredictorConfig(
            context_length=context_length, max_contexts=max_contexts, threshold=threshold,
            panel_size=panel_size, coact_max_positions=coact_positions or None,
            input_min_contexts=input_min_contexts,
            input_max_contexts=input_max_contexts, prompt=prompt, factor=factor,
            with_output_scores=output_scores, exclude_bos=not include_bos,
            skip_nonfinite=skip_nonfinite,
        )
        with progress_bar() as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            path = run_predictors(out, sae=sae, model=model, corpus=corpus, config=cfg,
                                  progress=progress)
        console.print(f"wrote {path} and {path.parent / 'manifest.json'}")

    @bench_app.command("predictors")
    @friendly
    def bench_predictors_cmd(
        json_path: JsonOpt,
        sae: SaeOpt = DEFAULT_SAE,
        model: ModelOpt = None,
        max_contexts: Annotated[int | None, typer.Option()] = None,
        repeats: RepeatsOpt = 5,
        memory_check: Annotated[bool, typer.Option(
            help="also run the 131,072-wide synthetic SAE memory check")] = True,
        memory_all_shards: Annotated[bool, typer.Option(
            help="memory check: build the table for all 131,072 features, not 3 shards")] = False,
    ) -> None:
        """Predictor pass vs model forward + SAE encode; synthetic 131K-wide memory check."""
        _quiet_hf()
        from steerscope.benchmarks.predictors import bench_predictors

        _report(bench_predictors(model, sae, max_contexts=max_contexts, repeats=repeats,
                                 memory_check=memory_check, memory_all_shards=memory_all_shards),
                json_path)

    @bench_app.command("output-scores")
    @friendly
    def bench_output_scores_cmd(
        json_path: JsonOpt,
        sae: SaeOpt = DEFAULT_SAE,
        model: ModelOpt = None,
        repeats: RepeatsOpt = 3,
        reference_features: Annotated[int, typer.Option(
            help="features the reference loop runs (its time is scaled to all); 0 = all")] = 256,
    ) -> None:
        """Batched output scores of every feature vs one hooked forward per feature."""
        _quiet_hf()
        from steerscope.benchmarks.predictors import bench_output_scores

        _report(bench_output_scores(model, sae, repeats=repeats,
                                    reference_features=reference_features or None), json_path)
