"""Assemble ``predictors.parquet``: one streamed corpus pass, then per-feature shards.

Stage 1, the **corpus pass**, runs the model up to the SAE's site and the SAE encoder over every
context once, turns each batch into its non-zero latents and feeds the streaming accumulators
(:class:`CorpusStats`: activation moments for all positions and for final positions, the
co-activation panel counts, each feature's top contexts). Its state is checkpointed to the work
directory every ``checkpoint_s`` seconds; a killed run resumes from the last checkpoint and,
since batches are cut at the same context boundaries, reaches the bit-identical state.

Stage 2, the **feature table**, is row-wise: geometry, direct-logit footprint, logit lens, input
and output scores and the finalized corpus statistics for a range of features. It runs in
shards of ``shard_features`` rows through :class:`steerscope.store.Shards`, so a rerun reuses
finished shards; output-score batches never straddle a shard, so a resumed table is identical.

Library code reports progress through ``progress(stage, done, total)`` and never prints.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from steerscope.errors import SteerscopeError
from steerscope.predictors.activation import MomentStats, SparseActs, moment_columns
from steerscope.predictors.coactivation import Coactivation
from steerscope.predictors.geometry import decoder_geometry
from steerscope.predictors.logits import DIRECT_TOPK, direct_logit_footprint, logit_lens_tokens
from steerscope.predictors.scores import (
    DEFAULT_FACTOR,
    DEFAULT_PROMPT,
    TopContexts,
    input_scores,
    output_scores,
)
from steerscope.predictors.sets import (
    COACTIVATION_COLUMNS,
    DIRECT_LOGIT_COLUMNS,
    GEOMETRY_COLUMNS,
    PREDICTOR_SETS,
)
from steerscope.saes import SAE
from steerscope.subject import Subject

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stage is ``"corpus"`` or ``"features"``."""

SCORE_COLUMNS = (
    "input_score", "input_score_n_contexts", "input_score_reason", "firing_contexts",
    "output_score", "output_score_clean", "output_score_delta", "output_score_token",
)
LIST_COLUMNS = (
    "logit_lens_tokens", "logit_lens_strings", "coact_top_partners", "coact_top_partner_frac",
)
COLUMNS: tuple[str, ...] = (
    "feature", *moment_columns("token_"), *moment_columns("final_"), *GEOMETRY_COLUMNS,
    *COACTIVATION_COLUMNS, *DIRECT_LOGIT_COLUMNS, *SCORE_COLUMNS, *LIST_COLUMNS,
)
"""Every column of ``predictors.parquet``, in order."""

Q95_BOUND = (
    "q95 from a log-bucket sketch: |q95_hat - q95| <= alpha * q95 for q95 in [lo, hi], "
    "<= lo below lo, exact 0 when q95 = 0, the exact max above hi"
)


@dataclass(frozen=True)
class PredictorConfig:
    """Options of a predictor run (all recorded in the manifest)."""

    context_length: int = 64
    max_contexts: int | None = None
    threshold: float = 1e-6
    exclude_bos: bool = True
    crowding_k: int = 20
    panel_size: int = 2048
    panel_warmup_tokens: int = 131072
    coact_max_positions: int | None = 98304  # Duan's 2,048 contexts x 48 tokens
    top_partners: int = 10
    lens_k: int = 20
    input_min_contexts: int = 20
    input_max_contexts: int = 100
    prompt: str = DEFAULT_PROMPT
    factor: float = DEFAULT_FACTOR
    with_output_scores: bool = True
    q95_alpha: float = 0.01
    q95_range: tuple[float, float] = (1e-4, 1e4)
    skip_nonfinite: bool = False
    batch_tokens: int = 4096
    shard_features: int = 8192
    checkpoint_s: float = 60.0  # 0: after every batch
    memory_mb: float = 512.0

    def validate(self) -> None:
        """Reject options that cannot give a meaningful table, with the fix."""
        checks = [
            (self.threshold >= 0 and math.isfinite(self.threshold),
             f"firing threshold {self.threshold} must be >= 0", "use e.g. --threshold 1e-6"),
            (self.panel_size >= 2, f"panel size {self.panel_size} is below 2",
             "use e.g. --panel-size 2048"),
            (self.coact_max_positions is None or self.coact_max_positions >= 1,
             f"co-activation positions {self.coact_max_positions} must be positive",
             "use e.g. --coact-positions 98304 (0 counts every position)"),
            (self.crowding_k >= 1, f"crowding k {self.crowding_k} is below 1", "use 20"),
            (self.lens_k >= 1, f"logit-lens k {self.lens_k} is below 1", "use 20"),
            (1 <= self.input_min_contexts <= self.input_max_contexts,
             f"input-score contexts {self.input_min_contexts}..{self.input_max_contexts} "
             "are not a range", "use --input-min-contexts 20 --input-max-contexts 100"),
            (math.isfinite(self.factor), f"factor {self.factor} is not finite", "use 10"),
            (self.batch_tokens >= 1 and self.shard_features >= 1 and self.memory_mb > 0,
             "batch sizes and memory budget must be positive", "use the defaults"),
            (self.context_length >= 2, f"context length {self.context_length} is too short",
             "use at least 2 tokens (BOS + text)"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise SteerscopeError(problem, fix)


# ---------------------------------------------------------------------------------- stage 1
@dataclass
class Batch:
    """One corpus batch as non-zero latents plus, per row (position), where it came from."""

    acts: SparseActs
    context: torch.Tensor  # global context index per row (non-decreasing)
    token: torch.Tensor  # token id per row
    final: torch.Tensor  # bool: row is its context's last position
    n_contexts: int
    skipped: list[int] = field(default_factory=list)
    final_acts: SparseActs | None = None  # the final rows alone (derived when absent)

    def finals(self) -> SparseActs:
        """The latents of the final positions (rows renumbered 0..n_final-1)."""
        if self.final_acts is None:
            self.final_acts = self.acts.select_rows(self.final)
        return self.final_acts


class CorpusStats:
    """Every streaming accumulator of the corpus pass, updated together.

    Co-activation is the one statistic whose cost grows with L0^2 per position (about as much
    as the SAE encode itself at L0 ~ 50), so it is counted on every ``coact_stride``-th
    context: enough of them for ``config.coact_max_positions`` positions, spread evenly
    through the corpus (default 98,304: the 2,048 x 48 positions Duan's scripts count).
    ``None`` counts all.
    """

    def __init__(
        self, d_sae: int, config: PredictorConfig, n_contexts: int | None = None,
        width: int | None = None,
    ) -> None:
        c = config
        limit = c.coact_max_positions
        self.coact_stride = 1
        if limit is not None and n_contexts is not None and width is not None:
            self.coact_stride = max(1, math.ceil(n_contexts * width / max(1, limit)))
        sketch = {"sketch_alpha": c.q95_alpha, "sketch_range": tuple(c.q95_range)}
        self.d_sae = d_sae
        self.threshold = c.threshold
        self.token = MomentStats(d_sae, c.threshold, **sketch)
        self.final = MomentStats(d_sae, c.threshold, **sketch)
        self.coact = Coactivation(d_sae, c.panel_size, c.panel_warmup_tokens, c.top_partners)
        self.top = TopContexts(d_sae, c.input_max_contexts, c.threshold)
        self.next_context = 0
        self.skipped: list[int] = []

    def update(self, batch: Batch) -> None:
        a = batch.acts
        firing = a.vals > self.threshold
        self.token.update(a.cols, a.vals, a.n_rows, firing)
        f = batch.finals()
        self.final.update(f.cols, f.vals, f.n_rows)
        if bool(firing.all()):
            rows, cols, vals = a.rows, a.cols, a.vals
        else:
            rows, cols, vals = a.rows[firing], a.cols[firing], a.vals[firing]
        if self.coact_stride == 1:
            self.coact.update(rows, cols, a.n_rows)
        else:
            keep = batch.context % self.coact_stride == 0
            if bool(keep.any()):
                sub = SparseActs(rows, cols, vals, a.n_rows, a.d_sae).select_rows(keep)
                self.coact.update(sub.rows, sub.cols, sub.n_rows)
        self.top.update(rows, cols, vals, batch.context, batch.token)
        self.next_context += batch.n_contexts
        self.skipped.extend(batch.skipped)

    def state_dict(self) -> dict[str, Any]:
        return {
            "token": self.token.state_dict(), "final": self.final.state_dict(),
            "coact": self.coact.state_dict(), "top": self.top.state_dict(),
            "next_context": self.next_context, "skipped": list(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.token.load_state_dict(state["token"])
        self.final.load_state_dict(state["final"])
        self.coact.load_state_dict(state["coact"])
        self.top.load_state_dict(state["top"])
        self.next_context = int(state["next_context"])
        self.skipped = list(state["skipped"])


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch's intra-op work on one thread for the block, then restore the setting.

    The accumulators are chains of small element-wise / scatter ops on ~L0 x batch entries:
    splitting each over threads gains little, and on a busy machine every op's thread barrier
    waits for a descheduled sibling (we measured 10-30x slower stats with 2 threads under
    load). The model forward and the encoder keep all threads.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def corpus_batches(
    subject: Subject, sae: SAE, ids: torch.Tensor, config: PredictorConfig, start: int = 0
) -> Iterator[Batch]:
    """Encode contexts ``ids[start:]`` batch by batch (cut at fixed context boundaries)."""
    n, length = ids.shape
    step = batch_contexts(sae.d_sae, length, config)
    for lo in range(start, n, step):
        hi = min(n, lo + step)
        yield encode_batch(subject, sae, ids[lo:hi], lo, config)


def batch_contexts(d_sae: int, length: int, config: PredictorConfig) -> int:
    """Contexts per corpus batch: ``batch_tokens``, capped so the dense code fits
    ``memory_mb`` (the encoder's output is ``tokens x d_sae`` before it is sparsified)."""
    width = length - (1 if config.exclude_bos else 0)
    per_token = max(1, d_sae) * 4 * 3  # dense code + its non-zero pass, float32
    tokens = min(config.batch_tokens, max(width, int(config.memory_mb * 2**20 // per_token)))
    return max(1, tokens // width)


def encode_batch(
    subject: Subject, sae: SAE, ids: torch.Tensor, context0: int, config: PredictorConfig
) -> Batch:
    """The non-zero latents of contexts ``ids`` (global indices from ``context0``)."""
    b, length = ids.shape
    first_pos = 1 if config.exclude_bos else 0
    width = length - first_pos
    x = subject.capture(ids, [sae.hook])[sae.hook][:, first_pos:]
    toks = ids[:, first_pos:].reshape(-1)
    keep = torch.ones(b, dtype=torch.bool)
    with single_thread():
        # One reduction decides the common case: a finite sum means every entry is finite (a
        # NaN / inf propagates); only a non-finite sum pays for the element-wise search.
        bad_x = None if _all_finite(x) else ~torch.isfinite(x).all(-1)  # [b, width]
    if bad_x is not None and bool(bad_x.any()):
        c, p = (int(v) for v in bad_x.nonzero()[0])
        if not config.skip_nonfinite:
            raise SteerscopeError(
                f"the model's activation at {sae.hook} is not finite in context "
                f"{context0 + c} (position {p + first_pos})",
                "pass --skip-nonfinite to drop such contexts, or check the model's dtype",
            )
        keep &= ~bad_x.any(1)
    code = sae.encode(x.reshape(b * width, -1))
    if code.is_sparse:
        code = code.to_dense()
    with single_thread():
        acts = SparseActs.from_dense(code)
        final_acts = SparseActs.from_dense(code.view(b, width, -1)[:, -1])
        bad = None if _all_finite(acts.vals) else ~torch.isfinite(acts.vals)
    if bad is not None and bool(bad.any()):
        e = int(bad.nonzero()[0, 0])
        row, feat = int(acts.rows[e]), int(acts.cols[e])
        if not config.skip_nonfinite:
            raise SteerscopeError(
                f"SAE activation of feature {feat} is {float(acts.vals[e])} in context "
                f"{context0 + row // width} (position {row % width + first_pos})",
                "pass --skip-nonfinite to drop such contexts, or check the SAE's weights",
            )
        keep[torch.unique(acts.rows[bad] // width)] = False
    context = torch.arange(context0, context0 + b).repeat_interleave(width)
    final = (torch.arange(b * width) % width) == width - 1
    skipped: list[int] = []
    if not bool(keep.all()):
        skipped = (torch.nonzero(~keep)[:, 0] + context0).tolist()
        row_keep = keep.repeat_interleave(width)
        acts = acts.select_rows(row_keep)
        context, toks, final = context[row_keep], toks[row_keep], final[row_keep]
        final_acts = final_acts.select_rows(keep)
    return Batch(acts, context, toks, final, b, skipped, final_acts)


def _all_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite (exact: an overflowing sum falls back to the caller's
    element-wise check, which then finds nothing)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def corpus_pass(
    subject: Subject,
    sae: SAE,
    ids: torch.Tensor,
    config: PredictorConfig,
    *,
    work_dir: Path | None = None,
    key: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> CorpusStats:
    """Stream every context through the accumulators, checkpointing to ``work_dir``."""
    width = int(ids.shape[1]) - (1 if config.exclude_bos else 0)
    stats = CorpusStats(sae.d_sae, config, int(ids.shape[0]), width)
    ckpt = None if work_dir is None else Path(work_dir) / "corpus-state.pt"
    stamp = json.dumps(key or {}, sort_keys=True, default=str)
    if ckpt is not None and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        if saved.get("key") == stamp:
            stats.load_state_dict(saved["state"])
    n = int(ids.shape[0])
    last_save, save_cost = time.monotonic(), 0.0
    if progress is not None:
        progress("corpus", stats.next_context, n)
    for batch in corpus_batches(subject, sae, ids, config, stats.next_context):
        with single_thread():
            stats.update(batch)
        if ckpt is not None and (
            config.checkpoint_s <= 0 or stats.next_context == n
            or time.monotonic() - last_save >= max(config.checkpoint_s, 10 * save_cost)
        ):  # a wide SAE's state is GBs: by default spend at most ~10% of the time saving it
            t = time.monotonic()
            _save_state(ckpt, stamp, stats)
            last_save = time.monotonic()
            save_cost = last_save - t
        if progress is not None:
            progress("corpus", stats.next_context, n)
    if len(stats.skipped) == n:
        raise SteerscopeError(
            "every context had non-finite activations", "check the model and SAE weights"
        )
    return stats


def _save_state(path: Path, stamp: str, stats: CorpusStats) -> None:
    from steerscope.store import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"key": stamp, "state": stats.state_dict()}, tmp)


# ---------------------------------------------------------------------------------- stage 2
def feature_table(
    subject: Subject,
    sae: SAE,
    stats: CorpusStats,
    config: PredictorConfig,
    *,
    work_dir: Path | None = None,
    key: dict[str, Any] | None = None,
    progress: Progress | None = None,
    only_shards: list[int] | None = None,
) -> pd.DataFrame:
    """One row per feature from the finished corpus statistics and the weights.

    ``only_shards`` computes just those feature shards (the memory benchmark uses it: a
    shard's memory does not depend on how many others run)."""
    d_sae = sae.d_sae
    act = {**stats.token.finalize("token_"), **stats.final.finalize("final_")}
    W_U = subject.W_U.detach()
    tokenizer = subject.tokenizer
    n_shards = math.ceil(d_sae / config.shard_features)

    def shard(i: int) -> pd.DataFrame:
        lo = i * config.shard_features
        hi = min(d_sae, lo + config.shard_features)
        rows = slice(lo, hi)
        feats = np.arange(lo, hi)
        w_dec = sae.W_dec.detach()[rows]
        cols: dict[str, Any] = {"feature": feats.astype(np.int64)}
        cols.update({k: v[rows] for k, v in act.items()})
        cols.update(decoder_geometry(sae.W_enc, sae.W_dec, rows, k=config.crowding_k))
        cols.update(stats.coact.finalize(feats))
        cols.update(direct_logit_footprint(w_dec, W_U, ks=DIRECT_TOPK))
        lens = logit_lens_tokens(subject, w_dec, config.lens_k)
        cols.update(input_scores(
            stats.top.token[rows], stats.top.n_contexts[rows], lens,
            config.input_min_contexts, config.input_max_contexts,
        ))
        cols["firing_contexts"] = stats.top.n_contexts[rows].numpy().astype(np.int64)
        if config.with_output_scores:
            cols.update(output_scores(
                subject, sae, lens, torch.from_numpy(feats), prompt=config.prompt,
                factor=config.factor, memory_mb=config.memory_mb,
            ))
        else:
            for c in ("output_score", "output_score_clean", "output_score_delta"):
                cols[c] = np.full(len(feats), np.nan)
            cols["output_score_token"] = np.full(len(feats), -1, dtype=np.int64)
        cols["logit_lens_tokens"] = _object_rows(lens.numpy())
        cols["logit_lens_strings"] = _object_rows(
            np.array([tokenizer.convert_ids_to_tokens(r) for r in lens.tolist()], dtype=object)
            if tokenizer is not None else np.empty((len(feats), 0), dtype=object)
        )
        return pd.DataFrame({c: cols[c] for c in COLUMNS})

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress("features", min(d_sae, done * config.shard_features), d_sae)

    if work_dir is None or only_shards is not None:
        parts = []
        todo = range(n_shards) if only_shards is None else only_shards
        for j, i in enumerate(todo):
            parts.append(shard(i))
            report(j + 1, n_shards)
        return pd.concat(parts, ignore_index=True)
    from steerscope.store import Shards

    return Shards(Path(work_dir) / "features", key or {}).run(n_shards, shard, report)


def _object_rows(arr: np.ndarray) -> np.ndarray:
    out = np.empty(len(arr), dtype=object)
    for i, row in enumerate(arr):
        out[i] = np.asarray(row)
    return out


# ---------------------------------------------------------------------------------- entry points
@dataclass
class PredictorResult:
    """The table plus what the manifest records about the run."""

    table: pd.DataFrame
    info: dict[str, Any]


def check_inputs(subject: Subject, sae: SAE, ids: torch.Tensor, config: PredictorConfig) -> None:
    """Fail before any work on mismatched inputs or too little text for the statistics."""
    config.validate()
    sae.check(subject)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise SteerscopeError(
            f"contexts must be [n, length >= 2] token ids, got {tuple(ids.shape)}",
            "build them with steerscope.corpus.load_contexts",
        )
    need = max(config.input_min_contexts, 20)
    n = int(ids.shape[0])
    if n < need:
        raise SteerscopeError(
            f"the corpus gives {n} contexts of {ids.shape[1]} tokens; the statistics need at "
            f"least {need} (20 final positions for a q95, and the input score's "
            f"{config.input_min_contexts} top contexts)",
            "give more text or a shorter --context-length",
        )
    if int(ids.max()) >= subject.vocab_size or int(ids.min()) < 0:
        raise SteerscopeError(
            f"token id {int(ids.max())} is outside the model's vocabulary ({subject.vocab_size})",
            "build the contexts with this model's tokenizer",
        )
    if not bool(torch.isfinite(sae.W_dec).all() and torch.isfinite(sae.W_enc).all()):
        bad = (~torch.isfinite(sae.W_dec)).any(1).nonzero()
        which = f"decoder row {int(bad[0])}" if len(bad) else "encoder"
        raise SteerscopeError(
            f"SAE '{sae.name}' has non-finite weights ({which})", "re-train or re-download it"
        )


def compute_predictors(
    subject: Subject,
    sae: SAE,
    ids: torch.Tensor,
    config: PredictorConfig | None = None,
    *,
    work_dir: str | Path | None = None,
    key: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> PredictorResult:
    """Predictor table of every feature of ``sae`` over the contexts ``ids [n, T]``.

    With ``work_dir`` the corpus state and the finished feature shards are kept there, and a
    rerun with the same ``key`` resumes from them.
    """
    config = config or PredictorConfig()
    ids = torch.as_tensor(ids).long()
    check_inputs(subject, sae, ids, config)
    full_key = {"config": asdict(config), "n_contexts": int(ids.shape[0]),
                "length": int(ids.shape[1]), **(key or {})}
    wd = None if work_dir is None else Path(work_dir)
    t0 = time.perf_counter()
    stats = corpus_pass(subject, sae, ids, config, work_dir=wd, key=full_key, progress=progress)
    t1 = time.perf_counter()
    table = feature_table(subject, sae, stats, config, work_dir=wd, key=full_key,
                          progress=progress)
    t2 = time.perf_counter()
    coact = stats.coact
    info = {
        "n_features": int(sae.d_sae),
        "n_contexts": int(ids.shape[0]),
        "context_length": int(ids.shape[1]),
        "positions": int(stats.token.n),
        "final_positions": int(stats.final.n),
        "skipped_nonfinite_contexts": stats.skipped,
        "panel": {
            "size": int(len(coact.panel)) if coact.panel is not None else 0,
            "exact": config.panel_size >= sae.d_sae or coact.tokens <= config.panel_warmup_tokens,
            "chosen_from_positions": min(coact.tokens, config.panel_warmup_tokens),
        },
        "coactivation": {"positions": int(coact.tokens), "context_stride": stats.coact_stride,
                         "symmetric_blocks": len(coact.bounds) - 1 if coact.symmetric else 0},
        "q95_error_bound": {"alpha": config.q95_alpha, "range": list(config.q95_range),
                            "statement": Q95_BOUND},
        "output_score_engine": "steerscope.engine.CleanPrefix (last-token replay over a KV cache)",
        "seconds": {"corpus_pass": round(t1 - t0, 3), "feature_table": round(t2 - t1, 3)},
        "config": asdict(config),
        "predictor_sets": {k: list(v) for k, v in PREDICTOR_SETS.items()},
    }
    return PredictorResult(table, info)


def run_predictors(
    out: str | Path,
    *,
    sae: str = "relu-blocks.0.hook_resid_post",
    model: str | None = None,
    corpus: str = "tinystories-train.txt",
    config: PredictorConfig | None = None,
    progress: Progress | None = None,
) -> Path:
    """``out/predictors.parquet`` + ``out/manifest.json`` for an SAE (what the CLI runs).

    Work state lives in ``out/.predictors-work`` until the table is written, so an interrupted
    run resumes where it stopped; the table and manifest are written atomically at the end.
    """
    import shutil

    from steerscope.assets import corpus_path, resolve_model, resolve_sae
    from steerscope.corpus import load_contexts
    from steerscope.saes import load_sae
    from steerscope.store import manifest, write_json, write_parquet

    config = config or PredictorConfig()
    config.validate()
    out = Path(out)
    subject = Subject.load(resolve_model(model))
    source, sae_id = resolve_sae(sae)
    the_sae = load_sae(source, sae_id)
    the_sae.check(subject)
    if subject.tokenizer is None:
        raise SteerscopeError("the model has no tokenizer", "load a model directory with one")
    cpath = corpus_path(corpus)
    contexts = load_contexts(subject.tokenizer, cpath, config.context_length,
                             max_contexts=config.max_contexts)
    key = {"model": subject.name, "sae": the_sae.name, "corpus_sha256": contexts.digest}
    work = out / ".predictors-work"
    result = compute_predictors(subject, the_sae, contexts.ids, config, work_dir=work, key=key,
                                progress=progress)
    write_parquet(result.table, out / "predictors.parquet")
    write_json(
        manifest(model=subject.name, sae=the_sae.name, corpus=str(cpath),
                 corpus_sha256=contexts.digest, seed=0, stage="predictors", hook=the_sae.hook,
                 columns=list(COLUMNS), **result.info),
        out / "manifest.json",
    )
    shutil.rmtree(work, ignore_errors=True)
    return out / "predictors.parquet"
