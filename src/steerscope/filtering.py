"""The output-score filter experiment (Arad et al., docs/methods.md §1.5–1.6), end to end.

Arad et al. report that keeping only features whose output score ``S_out`` reaches a threshold θ
raises mean GenSuccess@20 2–3× (0.5–0.6 unfiltered → 1.1–1.4 at θ = 0.9 on Gemma-2). This module
re-runs that experiment on any model + SAE:

1. steered generation for features × strengths × neutral prefixes (:mod:`steerscope.generation`,
   Arad's convention by default: ``a_f += s · max_j a_j`` at the last position of every decoding
   step, SAE error kept);
2. GenSuccess@k, perplexity under the unsteered model and distinct-n per generation
   (:mod:`steerscope.gen_metrics`);
3. a strength per feature chosen by Arad's rule on one half of the prefixes, and every number
   reported on the *other* half (choosing and reporting on the same prefixes would reward luck);
4. mean held-out GenSuccess@20 of the features with ``S_out ≥ θ`` over Arad's θ grid, next to
   random feature subsets of the same size and bootstrap CIs — the reference code draws 10 random
   subsets and gives no interval, so a 2× that is noise cannot be told from a real one there;
5. the same with the screening issue's predicted clean score as the filter (when a
   ``screen.parquet`` is given) and with both filters together.

Output scores come from a predictors table when one is given (issue 6's ``output_score``);
otherwise they are computed with the same batched implementation (one cached prompt, every
feature one replayed token, exactly as in §1.3). The predicted clean score is screening's
``pred_clean_score`` column.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from steerscope.errors import SteerscopeError
from steerscope.gen_metrics import (
    ARAD_MAX_GEN_SUCCESS,
    distinct_n,
    gen_success,
    logit_lens_from_table,
    logit_lens_topk,
    perplexities,
    select_strengths,
)
from steerscope.generation import ARAD_SAMPLING, Request, Sampling, generate_requests

ARAD_THRESHOLDS = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9)
ARAD_STRENGTHS = (0.2, 0.4, 0.8, 1.2, 1.6, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 20.0)
DEFAULT_STRENGTHS = (0.4, 1.2, 2.0, 3.0, 4.0, 8.0, 20.0)
"""A 7-point subset of Arad's grid for a run of a few minutes. It keeps 2–4, where features with
a high output score cross the GenSuccess cap of 3: with only 1.2 and 3 there, the cap leaves those
features at 1.2 and hides the effect the filter is meant to show."""
CLEAN_QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9)
NEUTRAL_PROMPT = "From my experience,"
PREFIX_SETS = ("tinystories", "general")
CLEAN_SKIPPED = ("no screen table given: the predicted-clean-score and combined filters need the "
                 "screening issue's screen.parquet (pred_clean_score), passed with --screen")
Progress = Callable[[str, float], None]


ARCH_NAMES = {"standard": "ReLU", "jumprelu": "JumpReLU", "topk": "TopK", "gated": "Gated"}


def arch_name(architecture: str) -> str:
    """SAELens's architecture name as the papers say it (``standard`` is the L1 ReLU SAE)."""
    return ARCH_NAMES.get(architecture, architecture)


# --------------------------------------------------------------------------- prefixes
def load_prefixes(spec: str | Path) -> list[str]:
    """A shipped prefix set (``tinystories``, ``general`` = Arad's 50) or a text file.

    One prefix per line, used exactly as written (trailing spaces matter for tokenizers that put
    word boundaries at the end of tokens); blank lines and lines starting with ``#`` are skipped.
    """
    name = str(spec)
    if name in PREFIX_SETS:
        text = resources.files("steerscope").joinpath(f"data/prefixes/{name}.txt").read_text(
            encoding="utf-8"
        )
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise SteerscopeError(
                f"prefix file '{spec}' does not exist",
                f"pass a text file with one prefix per line, or one of {', '.join(PREFIX_SETS)}",
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SteerscopeError(f"prefix file '{spec}' is not UTF-8", "convert it") from None
    prefixes = [ln.rstrip("\r") for ln in text.split("\n")]
    prefixes = [p for p in prefixes if p.strip() and not p.startswith("#")]
    if not prefixes:
        raise SteerscopeError(f"the prefix list '{spec}' is empty", "give at least two prefixes")
    return prefixes


def split_prefixes(n: int, seed: int) -> np.ndarray:
    """``"select"``/``"report"`` per prefix: a seeded half/half split (select gets the extra)."""
    if n < 2:
        raise SteerscopeError(
            f"{n} prefix given; strength selection and reporting need disjoint halves",
            "give at least two prefixes",
        )
    perm = np.random.default_rng(seed).permutation(n)
    split = np.empty(n, dtype=object)
    split[perm[: (n + 1) // 2]] = "select"
    split[perm[(n + 1) // 2:]] = "report"
    return split


# --------------------------------------------------------------------------- output score
def output_scores(
    subject: Any,
    sae: Any,
    features: Sequence[int],
    top_tokens: torch.Tensor,
    prompt: str | Sequence[int] = NEUTRAL_PROMPT,
    factor: float = 10.0,
) -> np.ndarray:
    """Arad's output score (§1.3) of each feature: ``(1 − r/|V|) · p`` of its best logit-lens
    token after ``a_f += factor · max_j a_j`` at the prompt's last position (SAE error kept).

    Delegates to :func:`steerscope.predictors.scores.output_scores` (the predictors issue's
    batched implementation: one cached prompt, one replayed token per feature), so the filter
    experiment and the predictors table use the same numbers.
    """
    from steerscope.predictors.scores import output_scores as batched_output_scores

    feats = torch.as_tensor(list(features), dtype=torch.long)
    cols = batched_output_scores(subject, sae, top_tokens.to(torch.long), feats, prompt=prompt,
                                 factor=factor)
    return np.asarray(cols["output_score"], dtype=float)


# --------------------------------------------------------------------------- the curves
def _boot_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    return values[idx].mean(1)


def filter_curve(
    values: np.ndarray,
    keep_masks: Sequence[np.ndarray],
    labels: Sequence[float],
    *,
    n_boot: int = 2000,
    n_random: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Mean of ``values`` over each kept subset vs random subsets of the same size.

    Per threshold: ``n`` kept, ``mean`` with a percentile bootstrap 95% CI over the kept features,
    ``random_mean`` with the 2.5–97.5% range of ``n_random`` random equal-size subsets (the
    paper's baseline, which it draws 10 times), ``p_random`` = share of random subsets whose mean
    reaches the filtered mean (a one-sided permutation p-value), and ``ratio`` = filtered mean /
    mean of all features with a bootstrap CI that resamples *all* features jointly (so the
    correlation between the subset and the whole is kept).
    """
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    n_all = len(values)
    overall = float(values.mean()) if n_all else math.nan
    boot_idx = rng.integers(0, n_all, size=(n_boot, n_all)) if n_all else None
    out = []
    for label, keep in zip(labels, keep_masks, strict=True):
        keep = np.asarray(keep, dtype=bool)
        n = int(keep.sum())
        row: dict[str, Any] = {"threshold": float(label), "n": n, "frac": n / n_all if n_all else 0}
        if n == 0:
            row.update(mean=None, ci_lo=None, ci_hi=None, random_mean=None, random_lo=None,
                       random_hi=None, p_random=None, ratio=None, ratio_lo=None, ratio_hi=None)
            out.append(row)
            continue
        kept = values[keep]
        mean = float(kept.mean())
        boots = _boot_means(kept, n_boot, rng)
        rand = np.array([values[rng.choice(n_all, n, replace=False)].mean()
                         for _ in range(n_random)])
        assert boot_idx is not None
        bv, bk = values[boot_idx], keep[boot_idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios = (bv * bk).sum(1) / bk.sum(1) / bv.mean(1)
        ratios = ratios[np.isfinite(ratios)]
        row.update(
            mean=mean,
            ci_lo=float(np.percentile(boots, 2.5)), ci_hi=float(np.percentile(boots, 97.5)),
            random_mean=float(rand.mean()),
            random_lo=float(np.percentile(rand, 2.5)), random_hi=float(np.percentile(rand, 97.5)),
            p_random=float((rand >= mean - 1e-12).mean()),
            ratio=mean / overall if overall > 0 else None,
            ratio_lo=float(np.percentile(ratios, 2.5)) if len(ratios) else None,
            ratio_hi=float(np.percentile(ratios, 97.5)) if len(ratios) else None,
        )
        out.append(row)
    return out


def filter_experiment(
    features: pd.DataFrame,
    *,
    thresholds: Sequence[float] = ARAD_THRESHOLDS,
    clean_quantiles: Sequence[float] = CLEAN_QUANTILES,
    n_boot: int = 2000,
    n_random: int = 2000,
    seed: int = 0,
    min_n: int = 10,
) -> dict[str, Any]:
    """All filter curves from a per-feature table with ``gen_success`` (held out, at the chosen
    strength), ``output_score`` and optionally ``clean_score``.

    Features whose strengths were all filtered out (``gen_success`` NaN) are left out, as in the
    reference code. The ``headline`` is the largest θ that still keeps ``min_n`` features and 5%
    of them (for small runs a fifth, at least 3): fewer make the mean too noisy to compare.
    """
    df = features[np.isfinite(features["gen_success"].to_numpy(dtype=float))]
    vals = df["gen_success"].to_numpy(dtype=float)
    s_out = df["output_score"].to_numpy(dtype=float)
    res: dict[str, Any] = {
        "n_features": len(df), "n_without_strength": int(len(features) - len(df)),
        "mean_all": float(vals.mean()) if len(vals) else None,
        "output_score": filter_curve(vals, [s_out >= t for t in thresholds], thresholds,
                                     n_boot=n_boot, n_random=n_random, seed=seed),
    }
    min_n = max(min(min_n, max(3, len(df) // 5)), len(df) // 20)
    ok = [r for r in res["output_score"] if r["n"] >= min_n]
    res["headline"] = ok[-1] if ok else None
    at01 = [r for r in res["output_score"] if r["threshold"] == 0.01]
    res["at_0.01"] = at01[0] if at01 else None
    res["spearman"] = _spearman_ci(s_out, vals, n_boot, seed)
    if "clean_score" in df.columns and df["clean_score"].notna().any():
        clean = df["clean_score"].to_numpy(dtype=float)
        finite = np.isfinite(clean)
        qs = [float(np.quantile(clean[finite], q)) for q in clean_quantiles]
        curve = filter_curve(vals, [finite & (clean >= q) for q in qs], clean_quantiles,
                             n_boot=n_boot, n_random=n_random, seed=seed + 1)
        for row, q in zip(curve, qs, strict=True):
            row["quantile"], row["threshold"] = row["threshold"], q
        res["clean_score"] = curve
        med = float(np.median(clean[finite]))
        res["both"] = filter_curve(
            vals, [(s_out >= t) & finite & (clean >= med) for t in thresholds], thresholds,
            n_boot=n_boot, n_random=n_random, seed=seed + 2,
        )
        res["both_clean_threshold"] = med
    return res


def _spearman_ci(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Spearman ρ between output score and GenSuccess with a percentile bootstrap 95% CI: a
    threshold-free summary that does not depend on how many features pass a high θ."""
    from scipy.stats import spearmanr

    if len(x) < 3:
        return {"rho": None, "lo": None, "hi": None}
    rng = np.random.default_rng(seed + 7)
    boots = []
    with warnings.catch_warnings():  # a constant resample has no ρ: skipped, not warned about
        warnings.simplefilter("ignore")
        rho = float(spearmanr(x, y).statistic)
        for _ in range(min(n_boot, 1000)):
            idx = rng.integers(0, len(x), len(x))
            r = spearmanr(x[idx], y[idx]).statistic
            if np.isfinite(r):
                boots.append(float(r))
    if not np.isfinite(rho):
        return {"rho": None, "lo": None, "hi": None}
    if not boots:
        return {"rho": rho, "lo": None, "hi": None}
    return {"rho": rho, "lo": float(np.percentile(boots, 2.5)),
            "hi": float(np.percentile(boots, 97.5))}


def fixed_strength_curves(
    table: pd.DataFrame,
    output_score: dict[int, float],
    thresholds: Sequence[float] = ARAD_THRESHOLDS,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """The output-score filter at each *fixed* strength (held-out prefixes), no selection rule.

    Arad's per-feature strength choice adapts the strength to each feature, which can hide what
    the output score predicts: how readily a feature's tokens appear at a given push. These
    curves show that directly, one per strength of the grid.
    """
    rep = table[(table["split"] == "report") & (table["strength"] > 0)]
    out = []
    for s, g in rep.groupby("strength", sort=True):
        vals = g["gen_success"].to_numpy(dtype=float)
        so = g["feature"].map(output_score).to_numpy(dtype=float)
        curve = filter_curve(vals, [so >= t for t in thresholds], thresholds, **kwargs)
        out.append({"strength": float(s), "mean_all": float(vals.mean()), "curve": curve})
    return out


# --------------------------------------------------------------------------- the run
@dataclass
class EvalConfig:
    """Everything a generate-eval run depends on (recorded in the manifest)."""

    features: int | list[int] = 512
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    prefixes: str = "tinystories"
    sampling: Sampling = field(default_factory=lambda: ARAD_SAMPLING)
    scale: str = "position_max"
    unit: bool = False
    positions: str | int = "last"
    k: int = 20
    max_gen_success: float = ARAD_MAX_GEN_SUCCESS
    seed: int = 0
    batch_size: int = 512
    neutral_prompt: str = NEUTRAL_PROMPT
    output_factor: float = 10.0
    thresholds: tuple[float, ...] = ARAD_THRESHOLDS
    n_boot: int = 2000
    n_random: int = 2000


def _choose_features(d_sae: int, spec: int | list[int], seed: int) -> list[int]:
    if isinstance(spec, int):
        if spec < 1:
            raise SteerscopeError(f"--features {spec} is invalid", "use a positive number")
        if spec >= d_sae:
            return list(range(d_sae))
        rng = np.random.default_rng(seed)
        return sorted(int(f) for f in rng.choice(d_sae, spec, replace=False))
    feats = sorted({int(f) for f in spec})
    if not feats:
        raise SteerscopeError("the feature list is empty", "give at least one feature")
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad:
        raise SteerscopeError(
            f"feature {bad[0]} is out of range (d_sae={d_sae})",
            f"use features from 0 to {d_sae - 1}",
        )
    return feats


def _read_scores(path: str | Path | None, column_hint: str | None, kind: str) -> pd.Series | None:
    if path is None:
        return None
    from steerscope.store import read_parquet

    table = read_parquet(path)
    if "feature" not in table.columns:
        raise SteerscopeError(f"table '{path}' has no 'feature' column", "pass a per-feature table")
    if column_hint:
        if column_hint not in table.columns:
            raise SteerscopeError(
                f"table '{path}' has no column '{column_hint}'",
                f"use one of {', '.join(map(str, table.columns))}",
            )
        col = column_hint
    elif kind == "output":
        col = "output_score" if "output_score" in table.columns else None
    else:
        preferred = [c for c in ("pred_clean_score", "predicted_clean_score")
                     if c in table.columns]
        cands = preferred or [c for c in table.columns
                              if "clean" in c and "pred" in c and "rank" not in c
                              and not {"lo", "hi"} & set(c.split("_"))]
        col = cands[0] if cands else None
    if col is None:
        if kind == "output":
            return None
        raise SteerscopeError(
            f"table '{path}' has no predicted clean score column",
            "name it with --clean-column",
        )
    return table.set_index("feature")[col].astype(float)


def _check_table_features(
    scores: pd.Series, d_sae: int, feats: Sequence[int], path: str | Path | None,
    need_overlap: bool = True,
) -> None:
    """A per-feature table must be about this SAE: its indices fit ``d_sae`` and (unless
    ``need_overlap`` is off) it has a finite score for one of the features being evaluated."""
    idx = scores.index.to_numpy()
    if len(idx) and (int(idx.max()) >= d_sae or int(idx.min()) < 0):
        raise SteerscopeError(
            f"table '{path}' has feature {int(idx.max())}, but the SAE has d_sae={d_sae}",
            "pass the table written for this SAE",
        )
    have = scores.reindex(list(feats)).to_numpy(dtype=float)
    if need_overlap and not np.isfinite(have).any():
        raise SteerscopeError(
            f"table '{path}' has no finite score for any of the {len(feats)} evaluated features",
            "pass the table written for this SAE",
        )


def _check_table_manifest(path: str | Path, sae: Any) -> None:
    """A table from another SAE of the same width joins by index without complaint and filters
    by unrelated scores; the manifest beside it (when there is one) names its SAE."""
    import json

    from steerscope.screening.data import _norm

    meta_path = Path(path).parent / "manifest.json"
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return
    theirs = meta.get("sae") if isinstance(meta, dict) else None
    if isinstance(theirs, list | tuple):
        theirs = theirs[0] if theirs else None
    ours = getattr(sae, "name", None)
    if theirs is not None and ours is not None and _norm(theirs) != _norm(ours):
        raise SteerscopeError(
            f"table '{path}' was written for SAE '{theirs}', not '{ours}'",
            "pass the table written for this SAE (or run it for this SAE first)",
        )


def run_generation_eval(
    subject: Any,
    sae: Any,
    config: EvalConfig,
    *,
    predictors: str | Path | None = None,
    screen: str | Path | None = None,
    clean_column: str | None = None,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Run the whole experiment in memory.

    Returns ``(table, per_feature, filter_result)``: ``table`` has one row per
    feature × strength × prefix split (strength 0 = the unsteered generations scored for that
    feature), ``per_feature`` one row per feature with its chosen strength and held-out metrics.
    """
    from steerscope.interventions import AdditiveSteer, check_strengths

    tell = progress or (lambda what, frac: None)
    t0 = time.perf_counter()
    strengths = sorted(set(check_strengths(list(config.strengths))))
    if any(s == 0 for s in strengths):
        strengths = [s for s in strengths if s != 0]
        if not strengths:
            raise SteerscopeError("the strength grid has only 0", "give positive strengths")
    prefixes = load_prefixes(config.prefixes)
    split = split_prefixes(len(prefixes), config.seed)
    feats = _choose_features(sae.d_sae, config.features, config.seed)

    tell("logit lens", 0.0)
    top = None
    pred_table = None
    if predictors is not None:
        from steerscope.store import read_parquet

        pred_table = read_parquet(predictors)
        top = logit_lens_from_table(pred_table, feats, config.k)
    if top is None:
        top = logit_lens_topk(subject, sae, config.k, feats)
    top_sets = [set(row.tolist()) for row in top]
    top1 = [set(row[:1].tolist()) for row in top]
    top5 = [set(row[:5].tolist()) for row in top]

    tell("output scores", 0.02)
    s_out = _read_scores(predictors, None, "output") if predictors is not None else None
    if s_out is not None:
        _check_table_features(s_out, sae.d_sae, feats, predictors, need_overlap=False)
        _check_table_manifest(predictors, sae)
    if s_out is not None and np.isfinite(s_out.reindex(feats).to_numpy(dtype=float)).all():
        out_scores = s_out.loc[feats].to_numpy(dtype=float)
        out_source = f"predictors table {predictors}"
    else:
        top_full = top if config.k >= 20 else logit_lens_topk(subject, sae, 20, feats)
        out_scores = output_scores(subject, sae, feats, top_full[:, :20], config.neutral_prompt,
                                   config.output_factor)
        out_source = f"computed (prompt {config.neutral_prompt!r}, ×{config.output_factor:g})"
    clean = _read_scores(screen, clean_column, "clean")
    if clean is not None:
        _check_table_features(clean, sae.d_sae, feats, screen)
        _check_table_manifest(screen, sae)

    # ---- generation: clean rows once per prefix, then feature × strength × prefix
    requests = [Request(p, None, seed=config.seed + j) for j, p in enumerate(prefixes)]
    meta = [(-1, 0.0, j) for j in range(len(prefixes))]
    for f in feats:
        for s in strengths:
            op = AdditiveSteer(f, s, unit=config.unit, positions=config.positions,  # type: ignore[arg-type]
                               scale=config.scale)  # type: ignore[arg-type]
            for j, p in enumerate(prefixes):
                requests.append(Request(p, op, seed=config.seed + j))
                meta.append((f, s, j))
    if requests[len(prefixes)].op is not None:
        requests[len(prefixes)].op.edit(sae)  # validates the operator once, before the long run
    tell("generating", 0.05)
    gens = generate_requests(
        subject, requests, config.sampling, sae, batch_size=config.batch_size,
        progress=lambda i, n: tell(f"generating {i}/{n}", 0.05 + 0.75 * i / n),
    )
    tell("perplexity", 0.8)
    ppl = perplexities(subject, [g.prompt_ids for g in gens], [g.tokens for g in gens],
                       batch_size=config.batch_size)
    tell("aggregating", 0.95)

    clean_gens = gens[: len(prefixes)]
    rows = []
    fi = {f: i for i, f in enumerate(feats)}
    by_key: dict[tuple[int, float, str], list[int]] = {}
    for idx, (f, s, j) in enumerate(meta):
        if f < 0:
            continue
        by_key.setdefault((f, s, str(split[j])), []).append(idx)
    for f in feats:
        i = fi[f]
        for part in ("select", "report"):
            js = [j for j in range(len(prefixes)) if split[j] == part]
            cg = [clean_gens[j] for j in js]
            rows.append(_aggregate(f, 0.0, part, cg, ppl[js], top_sets[i], top1[i], top5[i]))
            for s in strengths:
                ids = by_key[(f, s, part)]
                rows.append(_aggregate(f, s, part, [gens[x] for x in ids], ppl[ids],
                                       top_sets[i], top1[i], top5[i]))
    table = pd.DataFrame(rows)
    sel_in = table[(table["split"] == "select") & (table["strength"] > 0)]
    chosen = select_strengths(sel_in[["feature", "strength", "gen_success", "perplexity"]],
                              config.max_gen_success)
    choice = dict(zip(chosen["feature"], chosen["strength"], strict=True))
    table["selected"] = [
        bool(s > 0 and choice.get(f) == s) for f, s in zip(table["feature"], table["strength"],
                                                          strict=True)
    ]
    table["output_score"] = table["feature"].map(dict(zip(feats, out_scores, strict=True)))
    if clean is not None:
        table["clean_score"] = table["feature"].map(clean)

    rep = table[(table["split"] == "report") & table["selected"]].set_index("feature")
    base = table[(table["split"] == "report") & (table["strength"] == 0)].set_index("feature")
    per_feature = pd.DataFrame({"feature": feats})
    per_feature["strength"] = per_feature["feature"].map(choice)
    for col in ("gen_success", "gen_success_1", "gen_success_5", "perplexity", "distinct_2"):
        per_feature[col] = per_feature["feature"].map(rep[col])
    per_feature["gen_success_unsteered"] = per_feature["feature"].map(base["gen_success"])
    per_feature["output_score"] = out_scores
    if clean is not None:
        per_feature["clean_score"] = per_feature["feature"].map(clean)
    result = filter_experiment(per_feature, thresholds=config.thresholds, n_boot=config.n_boot,
                               n_random=config.n_random, seed=config.seed)
    result["fixed_strength"] = fixed_strength_curves(
        table, dict(zip(feats, out_scores, strict=True)), config.thresholds,
        n_boot=min(config.n_boot, 500), n_random=min(config.n_random, 500), seed=config.seed,
    )
    strength_counts = chosen["strength"].value_counts(dropna=False)
    result.update(
        sae=sae.name, hook=sae.hook, architecture=sae.architecture,
        n_prefixes={"select": int((split == "select").sum()),
                    "report": int((split == "report").sum())},
        output_score_source=out_source,
        clean_score_source=None if screen is None else str(screen),
        clean_score_skipped=None if screen is not None else CLEAN_SKIPPED,
        mean_unsteered=float(per_feature["gen_success_unsteered"].mean()),
        chosen_strengths={("none" if pd.isna(k) else f"{k:g}"): int(v)
                          for k, v in strength_counts.items()},
        mean_perplexity_selected=float(np.nanmean(per_feature["perplexity"]))
        if per_feature["perplexity"].notna().any() else None,
        prefixes=prefixes, prefix_split=[str(x) for x in split],
        n_generations=len(gens),
        n_generated_tokens=int(sum(len(g.tokens) for g in gens)),
        seconds=time.perf_counter() - t0,
    )
    result["note"] = filter_note(result)
    tell("done", 1.0)
    return table, per_feature, result


def _aggregate(
    feature: int, strength: float, split: str, gens: list[Any], ppl: np.ndarray,
    top: set[int], top1: set[int], top5: set[int],
) -> dict[str, Any]:
    toks = [g.tokens for g in gens]
    counts = [gen_success(t, top) for t in toks]
    return {
        "feature": feature, "strength": strength, "split": split, "n_generations": len(gens),
        "gen_success": float(np.mean(counts)),
        "gen_success_std": float(np.std(counts)),
        "gen_success_1": float(np.mean([gen_success(t, top1) for t in toks])),
        "gen_success_5": float(np.mean([gen_success(t, top5) for t in toks])),
        "perplexity": float(np.nanmean(ppl)) if np.isfinite(ppl).any() else math.nan,
        "distinct_1": distinct_n(toks, 1), "distinct_2": distinct_n(toks, 2),
        "mean_new_tokens": float(np.mean([len(t) for t in toks])),
        "frac_stopped": float(np.mean([g.finish == "stop" for g in gens])),
        "example": gens[0].text if gens else "",
        "texts": [g.text for g in gens],
    }


def _f(x: Any, spec: str = ".3f") -> str:
    """A number for the note/table, or "n/a" (a ratio to an unfiltered mean of 0 is undefined)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def _ratio_text(r: dict[str, Any] | None) -> str:
    if not r or r.get("mean") is None:
        return "no feature passes"
    ci = ""
    if r.get("ratio_lo") is not None and r.get("ratio_hi") is not None:
        ci = f" [95% CI {_f(r['ratio_lo'], '.2f')}–{_f(r['ratio_hi'], '.2f')}]"
    return (f"S_out ≥ {r['threshold']:g} keeps {r['n']} features: mean {_f(r['mean'])} = "
            f"{_f(r['ratio'], '.2f')}×{ci}, random subsets of that size {_f(r['random_mean'])} "
            f"(p = {_f(r['p_random'], '.3g')})")


def filter_note(result: dict[str, Any]) -> str:
    """One paragraph: does filtering by output score raise GenSuccess, by how much, with what CI,
    next to Arad et al.'s 2–3×. The verdict uses the largest θ that keeps enough features
    (Arad's 2–3× is a high-θ claim); θ = 0.01, 0.1, 0.3 and the rank correlation are added so a
    noisy tail cannot hide the overall picture."""
    h = result.get("headline")
    if not h or h.get("mean") is None:
        return "Too few features pass any output-score threshold to compare."
    lo, hi = h.get("ratio_lo"), h.get("ratio_hi")
    verdict = ("raises" if lo is not None and lo > 1 else
               "does not significantly change" if hi is not None and hi >= 1 else "lowers")
    others = [r for r in result["output_score"]
              if r["threshold"] in (0.01, 0.1, 0.3) and r["threshold"] != h["threshold"]]
    sp = result.get("spearman") or {}
    rho = ""
    if sp.get("rho") is not None and sp.get("lo") is not None:
        rho = (f" Spearman ρ(S_out, GenSuccess@20) = {sp['rho']:.2f} "
               f"[{sp['lo']:.2f}, {sp['hi']:.2f}].")
    fixed = ""
    fs = result.get("fixed_strength") or []
    if fs:  # the fixed strength whose unfiltered mean is closest to the selected-strength mean
        near = min(fs, key=lambda c: abs(c["mean_all"] - result["mean_all"]))
        row = [r for r in near["curve"] if r["threshold"] == h["threshold"]]
        if row and row[0]["mean"] is not None:
            fixed = (f" At the fixed strength {near['strength']:g} (no per-feature choice; "
                     f"unfiltered mean {near['mean_all']:.3f}), {_ratio_text(row[0])}.")
    clean = ""
    if result.get("clean_score"):
        row = next((r for r in result["clean_score"] if r.get("quantile") == 0.75), None)
        if row is not None and row["mean"] is not None:
            clean = (f" Predicted clean score ≥ its 75th percentile ({row['threshold']:.3g}) "
                     f"keeps {row['n']} features: mean {_f(row['mean'])} = "
                     f"{_f(row['ratio'], '.2f')}× [95% CI {_f(row['ratio_lo'], '.2f')}–"
                     f"{_f(row['ratio_hi'], '.2f')}], random subsets "
                     f"{_f(row['random_mean'])} (p = {_f(row['p_random'], '.3g')}).")
    elif result.get("clean_score_skipped"):
        clean = f" Predicted-clean-score filter skipped: {result['clean_score_skipped']}."
    return (
        f"{arch_name(result['architecture'])} SAE at {result['hook']}: filtering by output score "
        f"{verdict} held-out GenSuccess@20 at the highest threshold with enough features. "
        f"Unfiltered mean {result['mean_all']:.3f} over {result['n_features']} features "
        f"(unsteered {result.get('mean_unsteered', float('nan')):.3f}); {_ratio_text(h)}"
        + "".join(f"; {_ratio_text(r)}" for r in others) + "." + rho + fixed
        + " Arad et al. report 2–3× on Gemma-2 (0.5–0.6 → 1.1–1.4 at θ = 0.9)." + clean
    )


# --------------------------------------------------------------------------- judge
def judge_features(
    table: pd.DataFrame,
    result: dict[str, Any],
    judge: Any,
    *,
    top_tokens: dict[int, list[str]],
    n_features: int = 16,
    seed: int = 0,
    log: str | Path | None = None,
) -> dict[str, Any]:
    """AxBench-style judge ratings of the held-out generations at each feature's chosen strength.

    A seeded random sample of ``n_features`` features is judged (random, so the judged mean is
    comparable between filtered and unfiltered sets). The concept is described by the feature's
    logit-lens tokens — our features have no human labels — and the instruction is "continue the
    story" from the prefix. Each rating is appended to ``log`` (JSON lines) as soon as it exists,
    and ratings already in ``log`` are reused, so an interrupted run loses nothing.
    """
    import json

    from steerscope.judge import Rating

    prefixes = result["prefixes"]
    report = [p for p, s in zip(prefixes, result["prefix_split"], strict=True) if s == "report"]
    rows = table[(table["split"] == "report") & table["selected"]].sort_values("feature")
    if rows.empty:
        raise SteerscopeError("no feature has a chosen strength to judge", "check the grid")
    rng = np.random.default_rng(seed)
    pick = rows.iloc[sorted(rng.choice(len(rows), min(n_features, len(rows)), replace=False))]
    items, owners = [], []
    for r in pick.itertuples():
        words = ", ".join(repr(w) for w in top_tokens[int(r.feature)][:10])
        concept = f"text that uses words such as {words}"
        for prefix, text in zip(report, r.texts, strict=True):
            items.append((concept, f"Continue this children's story: {prefix}", text))
            owners.append(int(r.feature))
    done: list[Any] = []
    if log is not None and Path(log).is_file():
        for line in Path(log).read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
                if d.get("item") is not None and d.get("feature") == owners[d["item"]]:
                    done.append(Rating(**{k: d[k] for k in ("item", "concept", "instruction",
                                                            "fluency", "score", "unparsed")}))
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                continue

    def append(rating: Any) -> None:
        if log is None:
            return
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**rating.to_dict(), "feature": owners[rating.item]}) + "\n")

    ratings = judge.rate_many(items, on_rating=append, done=done)
    by_feat: dict[int, list[float]] = {}
    for r in ratings:
        by_feat.setdefault(owners[r.item], []).append(r.score)
    s_out = dict(zip(pick["feature"], pick["output_score"], strict=True))
    feats = sorted(by_feat)
    scores = np.array([np.mean(by_feat[f]) for f in feats])
    outs = np.array([s_out[f] for f in feats])
    h = result.get("headline") or {}
    theta = h.get("threshold", 0.01)
    keep = outs >= theta
    return {
        "n_features": len(feats), "n_ratings": len(ratings),
        "unparsed": int(sum(len(r.unparsed) for r in ratings)),
        "mean_score": float(scores.mean()),
        "threshold": theta,
        "mean_score_filtered": float(scores[keep].mean()) if keep.any() else None,
        "n_filtered": int(keep.sum()),
        "per_feature": {int(f): float(v) for f, v in zip(feats, scores, strict=True)},
    }
