"""Benchmark of the labels stage: the batched engine against the reference's one-feature loop.

Both arms label the same features over the same contexts in the same process:

* **steerscope** — :func:`steerscope.labels.labels_block`: every (feature, context, α) triple of
  a block of features is one replay of the final token over the cached clean prefix;
* **baseline** — the reference code's loop (Duan's ``gpt2_small_phase123.py``, cell 12): one
  feature at a time, a full forward of its 48 contexts in batches of 16 with a hook adding
  ``α · W_dec[f]`` at the final position, logits of every position, then the same label formulas.
  (The reference also re-ran the model once more per context type and SAE-encoded every position
  inside its hook; the baseline here does neither, so it is faster than the reference.)

Each arm has its own clean pass (the engine's cached prefix; the reference's full forwards in
batches of 16), timed separately. ``baseline_s`` / ``steerscope_s`` time the per-feature stage —
the part that scales with the number of features, which the reference also timed on its own —
interleaved block by block so that load from other processes on a shared machine hits both arms
alike. ``ratio_end_to_end`` adds the clean passes.

``ratio`` is timed in ``dtype`` (float32, what users run). ``max_abs_diff`` is over every label
column, measured by running both arms again in ``exact_dtype`` (float64) on the same features:
collateral counts are thresholded (``|Δu| > τ``) and context ranks are sorted, so in float32 a
rounding difference of 1e-6 between two exact methods can flip a count by one context (1/48) or
swap two tied contexts; in float64 rounding is ~1e-13 and any difference above 1e-4 is a real
discrepancy. The float32 run's own differences are reported too (``max_abs_diff_float32``, its
count flips, and the difference over the continuous columns), as is the float64 ratio.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from steerscope.errors import SteerscopeError

Progress = Callable[[str, float], None]


def bench_labels(
    model: str | None = None,
    sae: str = "relu-blocks.0.hook_resid_post",
    downstream_sae: str = "relu-blocks.1.hook_resid_post",
    corpus: str = "tinystories-train.txt",
    *,
    n_contexts: int = 2048,
    context_length: int = 48,
    n_features: int = 64,
    features: Sequence[int] | None = None,
    dtype: str = "float32",
    exact_dtype: str | None = "float64",
    naive_batch: int = 16,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Time engine vs reference loop on the same features; compare every label column."""
    from steerscope import assets
    from steerscope.corpus import load_contexts
    from steerscope.labels import check_features
    from steerscope.saes import load_sae
    from steerscope.subject import Subject

    for dt in (dtype, exact_dtype or dtype):
        if dt not in ("float64", "float32"):
            raise SteerscopeError(f"unknown benchmark dtype '{dt}'", "use float64 or float32")
    if n_features < 1:
        raise SteerscopeError(f"--features {n_features} < 1", "use e.g. 64")
    report = progress or (lambda _w, _f: None)
    report("loading", 0.0)
    subject = Subject.load(assets.resolve_model(model))
    primary = load_sae(*assets.resolve_sae(sae))
    down = load_sae(*assets.resolve_sae(downstream_sae))
    for module in (subject.model, primary.module, down.module):
        module.to(getattr(torch, dtype))
    ids = load_contexts(
        subject.tokenizer, assets.corpus_path(corpus), context_length, max_contexts=n_contexts
    ).ids
    if features is None:
        step = max(1, primary.d_sae // n_features)
        features = list(range(0, primary.d_sae, step))[:n_features]
    feats = check_features(primary, features)

    timed = _run_arms(subject, primary, down, ids, feats, naive_batch, report)
    exact = timed
    if exact_dtype is not None and exact_dtype != dtype:
        report(f"exactness check ({exact_dtype})", 0.0)
        for module in (subject.model, primary.module, down.module):
            module.to(getattr(torch, exact_dtype))
        exact = _run_arms(subject, primary, down, ids, feats, naive_batch, report)
    n = len(feats)
    t_b, t_e = timed["baseline_s"], timed["steerscope_s"]
    return {
        "name": "labels",
        "baseline_s": round(t_b, 4),
        "steerscope_s": round(t_e, 4),
        "ratio": round(t_b / t_e, 2),
        "max_abs_diff": float(f"{exact['diff']:.3g}"),
        "features_per_s": round(n / t_e, 2),
        "baseline_features_per_s": round(n / t_b, 3),
        "n_features": n,
        "n_contexts": int(ids.shape[0]),
        "context_length": int(ids.shape[1]),
        "dtype": dtype,
        "exact_dtype": exact_dtype or dtype,
        "threads": torch.get_num_threads(),
        "worst_column": exact["worst"],
        "count_flips": exact["flips"],
        f"max_abs_diff_{dtype}": float(f"{timed['diff']:.3g}"),
        f"count_flips_{dtype}": timed["flips"],
        f"max_abs_diff_{dtype}_continuous": float(f"{timed['diff_continuous']:.3g}"),
        f"ratio_{exact_dtype or dtype}": round(exact["baseline_s"] / exact["steerscope_s"], 2),
        "context_selection_mismatches": timed["mismatched"] + exact["mismatched"],
        "steerscope_clean_s": round(timed["clean_e"], 3),
        "baseline_clean_s": round(timed["clean_b"], 3),
        "ratio_end_to_end": round(
            (t_b + timed["clean_b"]) / (t_e + timed["clean_e"]), 2
        ),
        "baseline": f"one feature at a time, full forward of its contexts in batches of "
                    f"{naive_batch}, all-position logits (reference loop)",
        "sae": sae,
        "downstream_sae": downstream_sae,
    }


def _run_arms(
    subject: Any, primary: Any, down: Any, ids: torch.Tensor, feats: list[int],
    naive_batch: int, report: Progress,
) -> dict[str, Any]:
    """Both arms on the same features, interleaved block by block; timings and the comparison."""
    from steerscope.labels import (
        LabelOptions,
        block_size,
        labels_block,
        naive_labels_block,
        prepare,
    )

    options = LabelOptions()
    report("clean pass (engine)", 0.0)
    t0 = time.perf_counter()
    eng = prepare(subject, primary, down, ids, options)
    clean_e = time.perf_counter() - t0
    report("clean pass (reference)", 0.0)
    t0 = time.perf_counter()
    ref = prepare(subject, primary, down, ids, options, build_prefix=False)
    clean_b = time.perf_counter() - t0

    block = block_size(eng)
    ours, theirs = [], []
    t_e = t_b = 0.0
    labels_block(eng, feats[:1])  # warm-up: allocates the engine's gather buffers once
    for lo in range(0, len(feats), block):
        part = feats[lo:lo + block]
        t0 = time.perf_counter()
        ours.append(labels_block(eng, part))
        t_e += time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs.extend(naive_labels_block(ref, f, batch_size=naive_batch) for f in part)
        t_b += time.perf_counter() - t0
        report("labels", min(1.0, (lo + block) / len(feats)))
    a = pd.concat(ours, ignore_index=True)
    b = pd.concat(theirs, ignore_index=True)
    diff, worst, flips = _compare(a, b)
    continuous = [c for c in a.columns if not c.startswith("collateral_count")]
    diff_cont, _, _ = _compare(a[continuous], b[continuous])
    mismatched = sum(not np.array_equal(_contexts(eng, f), _contexts(ref, f)) for f in feats)
    return {
        "baseline_s": t_b, "steerscope_s": t_e, "clean_e": clean_e, "clean_b": clean_b,
        "diff": diff, "worst": worst, "flips": flips, "diff_continuous": diff_cont,
        "mismatched": int(mismatched),
    }


def _contexts(setup: Any, feature: int) -> np.ndarray:
    from steerscope.labels import context_rows

    return context_rows(setup, [feature])[0].numpy()


def _compare(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, str | None, int]:
    """Max |a − b| over label columns (NaN = NaN), the worst column, and count flips."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        raise AssertionError("the two arms produced different tables")
    worst, best = None, 0.0
    flips = 0
    for col in a.columns:
        if col in ("feature", "alpha"):
            continue
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        same_nan = np.isnan(x) & np.isnan(y)
        d = np.where(same_nan, 0.0, np.abs(x - y))
        d = np.where(np.isnan(d), np.inf, d)
        m = float(d.max()) if d.size else 0.0
        if col.startswith("collateral_count"):
            flips += int((d > 1e-9).sum())
        if m > best or worst is None:
            worst, best = col, max(m, best)
    return best, worst, flips
