"""``steerscope sensitivity`` end to end: load, sweep, render, write atomically.

Defaults are the embedded setup: TinyStories-656K, site ``blocks.0.hook_resid_post`` (between
its two blocks — the analogue of GPT-2's middle layer 6 that the paper perturbs), TinyStories
train text, and every embedded SAE trained at that site. The sweep contexts and the statistics
contexts are disjoint windows of the same corpus. Everything is computed and rendered before
the first file is written, so a failure leaves no partial output; each file is written
atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerscope.errors import SteerscopeError
from steerscope.saes import SAE
from steerscope.sensitivity.analysis import findings
from steerscope.sensitivity.runner import cpu_threads
from steerscope.sensitivity.sweep import (
    DEFAULT_SITE,
    Progress,
    SensitivityConfig,
    SensitivityResult,
    run_sensitivity,
)

DEFAULT_CORPUS = "tinystories-train.txt"


def load_saes(specs: Sequence[str] | None, site: str) -> tuple[list[SAE], list[str]]:
    """SAEs to sweep: the given specs (an empty list: none), or with ``None`` every embedded
    SAE trained at ``site``. Returns the SAEs and notes on what was left out."""
    from steerscope.assets import embedded_sae_names, resolve_sae
    from steerscope.saes import load_sae

    notes: list[str] = []
    if specs is not None:
        return [load_sae(*resolve_sae(s)) for s in specs], notes
    out = []
    for name in embedded_sae_names():
        sae = load_sae(*resolve_sae(name))
        if sae.hook == site:
            out.append(sae)
        else:
            notes.append(f"{name}: trained at {sae.hook}, not {site}")
    if not out:
        notes.append(f"no embedded SAE at {site}: SAE families skipped")
    return out, notes


def run_default(
    out: str | Path,
    *,
    model: str | None = None,
    site: str = DEFAULT_SITE,
    corpus: str = DEFAULT_CORPUS,
    saes: Sequence[str] | None = None,
    n_contexts: int = 32,
    stats_contexts: int = 256,
    context_length: int = 64,
    config: SensitivityConfig | None = None,
    progress: Progress | None = None,
    threads: int | None = None,
) -> dict[str, Path]:
    """Run the sweep and write ``sensitivity.parquet``, ``sensitivity.html`` and
    ``sensitivity.json`` (manifest + findings) into ``out``. Returns the written paths.

    ``threads``: torch CPU threads during the sweep (None: one for a small CPU model, see
    :func:`steerscope.sensitivity.runner.cpu_threads`)."""
    from steerscope.assets import corpus_path, resolve_model
    from steerscope.corpus import load_contexts
    from steerscope.sensitivity.figures import render_html
    from steerscope.store import atomic_path, manifest, write_json, write_parquet
    from steerscope.subject import Subject

    cfg = (config or SensitivityConfig()).validated()
    for name, v in (("--contexts", n_contexts), ("--stats-contexts", stats_contexts)):
        if v < 1:
            raise SteerscopeError(f"{name} {v} is not positive", f"pass {name} ≥ 1")
    subject = Subject.load(resolve_model(model))
    subject.site(site)
    if subject.tokenizer is None:
        raise SteerscopeError("the model has no tokenizer", "load a model directory with one")
    path = corpus_path(corpus)
    ctx = load_contexts(subject.tokenizer, path, context_length,
                        max_contexts=n_contexts + stats_contexts)
    if len(ctx) < n_contexts + 1:
        raise SteerscopeError(
            f"corpus '{corpus}' gives {len(ctx)} contexts of {context_length} tokens, fewer "
            f"than the {n_contexts} sweep contexts plus statistics contexts",
            "use a larger corpus, fewer --contexts or a shorter --context-length",
        )
    loaded, notes = load_saes(saes, site)
    with cpu_threads(subject, threads) as used:
        result = run_sensitivity(subject, ctx.ids[:n_contexts], ctx.ids[n_contexts:], site,
                                 loaded, cfg, progress)
    result.skipped[:0] = notes
    found = findings(result.table)
    meta = _meta(result, subject.name, str(path), ctx.digest, n_contexts, len(ctx) - n_contexts,
                 context_length)
    meta["threads"] = used
    page = render_html(result.table, meta, found)
    out = Path(out)
    paths = {"table": out / "sensitivity.parquet", "html": out / "sensitivity.html",
             "manifest": out / "sensitivity.json"}
    write_parquet(result.table, paths["table"])
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(page, encoding="utf-8")
    extra = {k: v for k, v in meta.items() if k not in ("model", "corpus", "corpus_sha256")}
    write_json(manifest(model=subject.name, sae=[s.name for s in loaded], corpus=str(path),
                        corpus_sha256=ctx.digest, seed=cfg.seed, **extra, findings=found),
               paths["manifest"])
    return paths


def _meta(result: SensitivityResult, model: str, corpus: str, digest: str, n_contexts: int,
          n_stats: int, length: int) -> dict[str, Any]:
    return {"model": model, "corpus": corpus, "corpus_sha256": digest,
            "sweep_contexts": n_contexts, "stats_contexts": n_stats, "context_length": length,
            **result.meta()}
