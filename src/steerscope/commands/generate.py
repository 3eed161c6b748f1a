"""``steerscope generate-eval`` and ``steerscope bench generation``.

Thin shells: parse options, call :func:`steerscope.filtering.run_generation_eval` (or the
benchmark), show progress, print where the outputs went. Bad input is a SteerscopeError raised by
the library and printed as one line by :func:`steerscope.cli.friendly`.

No ``from __future__ import annotations`` here: typer reads the option annotations at
registration time, and they refer to names imported inside :func:`register`.
"""

import json
from pathlib import Path
from typing import Annotated

import typer


def _floats(text: str, what: str) -> tuple[float, ...]:
    from steerscope.errors import SteerscopeError

    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise SteerscopeError(f"{what} '{text}' is not a list of numbers",
                              "write e.g. 0.4,1.2,3") from None


def _features(text: str) -> int | list[int]:
    from steerscope.errors import SteerscopeError

    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise SteerscopeError(f"--features '{text}' is not a count or a list of feature indices",
                              "write e.g. 256 or 3,17,42") from None
    if not vals:
        raise SteerscopeError("--features is empty", "write e.g. 256 or 3,17,42")
    return vals[0] if len(vals) == 1 and "," not in text else vals


THREADS_HELP = ("CPU intra-op threads; 0 = torch's default. 1 is the default because decoding a "
                "small model is many tiny ops, and on a shared CPU OpenMP's spin-waiting makes "
                "2 threads ~10× slower than 1")


def _set_threads(n: int) -> None:
    import torch

    from steerscope.errors import SteerscopeError

    if n < 0:
        raise SteerscopeError(f"--threads {n} is invalid", "use 0 (torch's default) or more")
    if n:
        torch.set_num_threads(n)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add ``generate-eval`` to the main app and ``generation`` to ``bench``."""
    from steerscope.cli import ModelOpt, SaeOpt, _quiet_hf, console, friendly, progress_bar

    @app.command("generate-eval")
    @friendly
    def generate_eval(
        out: Annotated[Path, typer.Option(help="output directory")],
        sae: Annotated[list[str] | None, typer.Option(
            "--sae", help="embedded SAE name, SAELens directory or release:sae_id; repeat it "
                          "for several SAEs (each in DIR/<name>/, one combined report)")
        ] = None,
        all_embedded: Annotated[bool, typer.Option(
            "--all-embedded", help="the ReLU, JumpReLU and TopK embedded SAEs at blocks.0, each "
                                   "in DIR/<name>/, one combined report")] = False,
        model: ModelOpt = None,
        features: Annotated[str, typer.Option(
            help="how many random features (e.g. 512), or a comma list of indices")] = "512",
        strengths: Annotated[str, typer.Option(
            help="strength grid (Arad: 0.2,0.4,0.8,1.2,1.6,2,3,4,6,8,10,20)")
        ] = "0.4,1.2,2,3,4,8,20",
        scale: Annotated[str, typer.Option(
            help="position_max (Arad: × largest latent) | absolute | feature_max")
        ] = "position_max",
        positions: Annotated[str, typer.Option(help="last (Arad) | all | an integer p")] = "last",
        unit: Annotated[bool, typer.Option(help="unit-normalise the decoder direction")] = False,
        prefixes: Annotated[str, typer.Option(
            help="tinystories | general (Arad's 50) | a text file, one prefix per line")
        ] = "tinystories",
        max_new_tokens: Annotated[int, typer.Option()] = 20,
        temperature: Annotated[float, typer.Option()] = 0.7,
        stop: Annotated[str, typer.Option(help="stop string ('' for none)")] = ".",
        k: Annotated[int, typer.Option(help="logit-lens set size for GenSuccess@k")] = 20,
        seed: Annotated[int, typer.Option()] = 0,
        batch_size: Annotated[int, typer.Option(help="rows generated together")] = 512,
        predictors: Annotated[Path | None, typer.Option(
            help="predictors.parquet to take output scores / logit-lens tokens from")] = None,
        screen: Annotated[Path | None, typer.Option(
            help="screen.parquet with the predicted clean score (adds those filter curves)")
        ] = None,
        clean_column: Annotated[str | None, typer.Option(
            help="column of screen.parquet holding the predicted clean score")] = None,
        judge: Annotated[bool, typer.Option(
            help="also rate held-out generations with the LLM judge (STEERSCOPE_JUDGE_* env)")
        ] = False,
        judge_features: Annotated[int, typer.Option(help="features to judge")] = 16,
        threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 1,
    ) -> None:
        """Steered generation, Arad's strength choice and the output-score filter experiment.

        Writes DIR/generation.parquet (feature × strength × prefix split), DIR/filter.json and
        the report section DIR/generation.html.
        """
        _quiet_hf()
        _set_threads(threads)
        from steerscope.assets import (
            DEFAULT_SAE,
            embedded_architectures,
            resolve_model,
            resolve_sae,
        )
        from steerscope.errors import SteerscopeError
        from steerscope.filtering import EvalConfig, load_prefixes, run_generation_eval
        from steerscope.generation import Sampling
        from steerscope.report.generation import write_combined_report, write_outputs
        from steerscope.saes import load_sae
        from steerscope.store import manifest
        from steerscope.subject import Subject

        pos: str | int = int(positions) if positions.lstrip("-").isdigit() else positions
        if not strengths.strip():
            raise SteerscopeError("the strength grid is empty", "give e.g. --strengths 0.4,1.2,3")
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            stop=(stop,) if stop else ())
        config = EvalConfig(
            features=_features(features), strengths=_floats(strengths, "--strengths"),
            prefixes=prefixes, sampling=sampling, scale=scale, unit=unit, positions=pos, k=k,
            seed=seed, batch_size=batch_size,
        )
        sampling.check()
        load_prefixes(prefixes)  # fail on a bad prefix list before loading anything
        if all_embedded and sae:
            raise SteerscopeError("--all-embedded and --sae both choose the SAEs",
                                  "give one of them")
        specs = (embedded_architectures() if all_embedded
                 else list(dict.fromkeys(sae or [DEFAULT_SAE])))
        if len(specs) > 1 and (predictors is not None or screen is not None):
            raise SteerscopeError(
                "--predictors / --screen tables belong to one SAE, but several --sae were given",
                "run generate-eval once per SAE with its own tables",
            )
        sources = [resolve_sae(spec) for spec in specs]
        model_src = resolve_model(model)
        subject = Subject.load(model_src)
        lenses = []
        for source, sae_id in sources:
            lens = load_sae(source, sae_id)
            lens.check(subject)
            lenses.append(lens)
        run_dirs = []
        for lens in lenses:
            run_dir = Path(out) if len(lenses) == 1 else Path(out) / Path(lens.name).name
            with progress_bar() as bar:
                task = bar.add_task(f"{lens.name}", total=1.0)
                table, per_feature, result = run_generation_eval(
                    subject, lens, config, predictors=predictors, screen=screen,
                    clean_column=clean_column,
                    progress=lambda what, frac, _t=task, _n=lens.name: bar.update(
                        _t, description=f"{_n}: {what}", completed=frac),
                )
            man = manifest(model=model_src, sae=lens.name, corpus=None, corpus_sha256=None,
                           seed=seed, config={**config.__dict__, "sampling": sampling.__dict__})
            paths = write_outputs(run_dir, table, per_feature, result, man)
            run_dirs.append(run_dir)
            console.print(result["note"], highlight=False, soft_wrap=True)
            for p in paths:
                console.print(f"wrote {p}")
            if judge:
                _judge(subject, lens, table, per_feature, result, run_dir, judge_features, seed)
        if len(run_dirs) > 1:
            console.print(f"wrote {write_combined_report(out, run_dirs)}")

    def _judge(subject, lens, table, per_feature, result, run_dir, n_features, seed) -> None:
        from steerscope.filtering import judge_features
        from steerscope.gen_metrics import logit_lens_topk
        from steerscope.judge import OpenAIJudge
        from steerscope.store import write_json

        tok = subject.tokenizer
        feats = sorted(int(f) for f in per_feature["feature"])
        ids = logit_lens_topk(subject, lens, 10, feats)
        top = {f: [tok.decode([t]) if tok is not None else str(t) for t in row]
               for f, row in zip(feats, ids.tolist(), strict=True)}
        log = Path(run_dir) / "judge.jsonl"
        summary = judge_features(table, result, OpenAIJudge(), top_tokens=top,
                                 n_features=n_features, seed=seed, log=log)
        data = json.loads((Path(run_dir) / "filter.json").read_text())
        data["judge"] = summary
        write_json(data, Path(run_dir) / "filter.json")
        console.print(f"judge: mean score {summary['mean_score']:.3f} over "
                      f"{summary['n_features']} features; ratings in {log}")

    @bench_app.command("generation")
    @friendly
    def bench_generation_cmd(
        json_path: Annotated[Path, typer.Option("--json", help="write the result here")],
        sae: SaeOpt = "relu-blocks.0.hook_resid_post",
        model: ModelOpt = None,
        prompts: Annotated[int, typer.Option(help="rows per batch")] = 64,
        new_tokens: Annotated[int, typer.Option(help="tokens generated per row")] = 32,
        repeats: Annotated[int, typer.Option(help="timed repeats per arm (median)")] = 15,
        threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 1,
    ) -> None:
        """Per-token time of steered vs unsteered generation (both with KV cache, same prompts);
        target ratio ≤ 1.10."""
        _quiet_hf()
        _set_threads(threads)
        from steerscope.benchmarks.generation import bench_generation
        from steerscope.store import write_json

        res = bench_generation(model=model, sae=sae, n_prompts=prompts, new_tokens=new_tokens,
                               repeats=repeats)
        write_json(res, json_path)
        console.print_json(json.dumps(res))
