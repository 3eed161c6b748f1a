"""``steerscope labels`` and ``steerscope bench labels``: thin shells over the labels API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

# Same as steerscope.cli.ModelOpt; repeated because importing steerscope.cli here is circular.
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="HF model dir or Hub id (default: TinyStories-656K)")
]
DEFAULT_SAE = "relu-blocks.0.hook_resid_post"
DEFAULT_DOWNSTREAM_SAE = "relu-blocks.1.hook_resid_post"


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add the ``labels`` verb and the ``bench labels`` benchmark."""
    from steerscope.cli import _quiet_hf, console, friendly, progress_bar

    @app.command("labels")
    @friendly
    def labels_cmd(
        out: Annotated[Path, typer.Option(help="directory for labels.parquet + manifest.json")],
        features: Annotated[str | None, typer.Option(
            help="all (default), a count N (the first N), a list 1,5,9 or a range 0-99")] = None,
        sae: Annotated[str, typer.Option(
            help="steering SAE: embedded name, SAELens directory, or release:sae_id")] = (
            DEFAULT_SAE),
        downstream_sae: Annotated[str, typer.Option(
            help="downstream SAE (a later hook), same forms as --sae; 'none' for logit labels "
                 "only")] = DEFAULT_DOWNSTREAM_SAE,
        model: ModelOpt = None,
        corpus: Annotated[str, typer.Option(help="text file (or shared corpus name)")] = (
            "tinystories-train.txt"),
        contexts: Annotated[int, typer.Option(help="number of contexts")] = 2048,
        context_length: Annotated[int, typer.Option(help="tokens per context (BOS incl.)")] = 48,
        alpha: Annotated[str, typer.Option(
            help="strength α on the raw decoder row; a grid 0.5,1,2 gives one row per α; "
                 "'auto' = median of max(q95, 1) (Duan's script)")] = "1.0",
        unit: Annotated[bool, typer.Option(help="steer along the unit decoder direction")] = False,
        per_type: Annotated[int, typer.Option(help="contexts per type (top/random/low)")] = 16,
        panel: Annotated[int, typer.Option(help="downstream panel: K most frequent latents")] = (
            2048),
        seed: Annotated[int, typer.Option(help="seed of the random contexts")] = 0,
        shard_size: Annotated[int, typer.Option(help="features per resumable shard")] = 256,
        memory_mb: Annotated[float, typer.Option(help="memory budget of the engine (MB)")] = 512,
        device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
        dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16")] = "float32",
    ) -> None:
        """Steering-modularity labels (Duan): stability, collateral, KL for every feature."""
        _quiet_hf()
        from steerscope.labels import LabelOptions, parse_alphas, run_labels

        options = LabelOptions(
            alphas=parse_alphas(alpha), per_type=per_type, panel_size=panel, seed=seed,
            unit=unit, memory_mb=memory_mb,
        )
        with progress_bar() as bar:
            task = bar.add_task("labels", total=1.0)
            path = run_labels(
                out, model=model, sae=sae, downstream_sae=downstream_sae, corpus=corpus,
                n_contexts=contexts, context_length=context_length, features=features,
                options=options, shard_size=shard_size, device=device, dtype=dtype,
                progress=lambda what, frac: bar.update(task, description=what, completed=frac),
            )
        console.print(f"wrote {path} and {path.parent / 'manifest.json'}")

    @bench_app.command("labels")
    @friendly
    def bench_labels_cmd(
        json_path: Annotated[Path, typer.Option("--json", help="write the result here")],
        features: Annotated[int, typer.Option(help="features labelled by both arms")] = 256,
        sae: Annotated[str, typer.Option(help="steering SAE")] = DEFAULT_SAE,
        downstream_sae: Annotated[str, typer.Option(help="downstream SAE")] = (
            DEFAULT_DOWNSTREAM_SAE),
        model: ModelOpt = None,
        dtype: Annotated[str, typer.Option(
            help="dtype of the timed run: float32 (default) or float64")] = "float32",
        exact_dtype: Annotated[str, typer.Option(
            help="dtype of the exactness check (max_abs_diff): float64 (default) or float32")] = (
            "float64"),
    ) -> None:
        """Labels: batched engine vs the reference one-feature-at-a-time loop, same run."""
        _quiet_hf()
        from steerscope.benchmarks.labels import bench_labels
        from steerscope.store import write_json

        with progress_bar() as bar:
            task = bar.add_task("bench labels", total=1.0)
            result = bench_labels(
                model, sae, downstream_sae, n_features=features, dtype=dtype,
                exact_dtype=exact_dtype,
                progress=lambda what, frac: bar.update(task, description=what, completed=frac),
            )
        write_json(result, json_path)
        print(json.dumps(result, indent=2))
