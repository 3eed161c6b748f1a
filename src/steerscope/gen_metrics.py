"""Metrics of steered generations (Arad et al., docs/methods.md §1.1 and §1.5).

* **GenSuccess@k** — how many generated tokens fall in the feature's logit-lens top-k set
  ``topk(W_U^T · LN_f(W_dec[f]))``. It is a *count per generation*, not a rate (it can exceed 1),
  averaged over generations. Only generated tokens count: we keep the token ids the model produced
  instead of re-tokenizing decoded text as the reference code does (§1.8), so the prompt is
  stripped exactly and BOS/EOS never count.
* **Perplexity** of the generated tokens under the *unsteered* model, conditioned on the prompt:
  ``exp(mean NLL)`` over the generated tokens. Steering that produces the concept by wrecking the
  text shows up here.
* **distinct-n** — unique n-grams / all n-grams over a set of generations (Li et al. 2016), the
  usual repetition check: a feature pushed too hard repeats one token.
* **Strength selection** — Arad's rule: drop strengths whose mean GenSuccess@20 exceeds 3 (the
  concept token is being spammed), then maximise ``GenSuccess_norm / Perplexity_norm``, each
  divided by its maximum over all rows. Both normalisers are global constants, so they do not
  change the argmax; they are kept so the reported score matches the paper's. Ties (typically a
  feature whose GenSuccess is 0 at every strength) go to the smallest strength, as ``argmax``
  does in the reference — which is why 0.2 is the paper's most common choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from steerscope.errors import SteerscopeError
from steerscope.subject import Subject

ARAD_MAX_GEN_SUCCESS = 3.0


# --------------------------------------------------------------------------- logit lens
def logit_lens_topk(
    subject: Subject,
    sae: Any,
    k: int = 20,
    features: Sequence[int] | None = None,
) -> torch.Tensor:
    """``[n_features, k]`` token ids: the top-k of ``unembed(W_dec[f])`` per feature.

    ``unembed`` is the model's final norm and LM head (Gemma's soft-cap is monotone, so it does not
    change the top-k; softmax does not either). Chunked so ``vocab × d_sae`` is never dense —
    the predictors issue's :func:`~steerscope.predictors.logits.logit_lens_tokens`, so both
    tables name the same tokens.
    """
    if k < 1:
        raise SteerscopeError(f"k={k} is invalid", "use k ≥ 1 (Arad et al. use 20)")
    W = sae.W_dec.detach()
    feats = torch.arange(W.shape[0]) if features is None else torch.as_tensor(
        list(features), dtype=torch.long
    )
    if feats.numel() and (int(feats.min()) < 0 or int(feats.max()) >= W.shape[0]):
        raise SteerscopeError(
            f"feature index out of range (d_sae={W.shape[0]})",
            f"use features from 0 to {W.shape[0] - 1}",
        )
    from steerscope.predictors.logits import logit_lens_tokens

    return logit_lens_tokens(subject, W[feats.to(W.device)], k)


def logit_lens_from_table(
    table: pd.DataFrame, features: Sequence[int], k: int
) -> torch.Tensor | None:
    """The logit-lens top-k ids stored in a predictors table, if it has them (else None).

    Accepts a list-valued column named like ``logit_lens_top20`` / ``logit_lens_tokens`` /
    ``logit_lens_ids`` holding token *ids* in rank order.
    """
    if "feature" not in table.columns:
        return None
    cands = [c for c in table.columns if c.startswith("logit_lens") and "str" not in c]
    for col in cands:
        first = table[col].iloc[0] if len(table) else None
        if first is None or isinstance(first, str) or not hasattr(first, "__len__"):
            continue
        try:
            ids = [int(t) for t in first]
        except (TypeError, ValueError):
            continue
        if len(ids) < k:
            continue
        by_feat = table.set_index("feature")[col]
        if not set(features) <= set(by_feat.index):
            return None
        return torch.tensor([[int(t) for t in by_feat[f][:k]] for f in features], dtype=torch.long)
    return None


# --------------------------------------------------------------------------- per generation
def gen_success(tokens: Sequence[int], top_tokens: Sequence[int] | set[int]) -> int:
    """Generated tokens that are in the feature's logit-lens set (a count, with repeats)."""
    top = top_tokens if isinstance(top_tokens, set) else {int(t) for t in top_tokens}
    return sum(1 for t in tokens if int(t) in top)


def gen_success_at_k(
    generations: Sequence[Sequence[int]], top_tokens: Sequence[int], k: int | None = None
) -> float:
    """Mean GenSuccess@k over generations; ``top_tokens`` in rank order (cut to ``k`` if given)."""
    if not generations:
        raise SteerscopeError("no generations to score", "generate at least one continuation")
    top = {int(t) for t in (list(top_tokens)[:k] if k is not None else top_tokens)}
    return float(np.mean([gen_success(g, top) for g in generations]))


def distinct_n(generations: Sequence[Sequence[int]], n: int = 2) -> float:
    """Unique n-grams / total n-grams over all generations (NaN when there is no n-gram)."""
    if n < 1:
        raise SteerscopeError(f"n={n} is invalid", "use n ≥ 1")
    grams: list[tuple[int, ...]] = []
    for g in generations:
        g = [int(t) for t in g]
        grams.extend(tuple(g[i:i + n]) for i in range(len(g) - n + 1))
    return float(len(set(grams)) / len(grams)) if grams else float("nan")


def perplexities(
    subject: Subject,
    prompts: Sequence[Sequence[int]],
    generations: Sequence[Sequence[int]],
    batch_size: int = 256,
) -> np.ndarray:
    """Per-row perplexity of ``generations[i]`` given ``prompts[i]`` under the unsteered model.

    ``exp(mean NLL)`` over the generated tokens only; NaN for an empty generation. Rows are
    left-padded in batches with explicit position ids, so the result equals the row alone.
    """
    from steerscope.generation import _model_forward, _positions

    if len(prompts) != len(generations):
        raise SteerscopeError("one prompt per generation is needed", "pass equal-length lists")
    out = np.full(len(prompts), np.nan)
    todo = [i for i, g in enumerate(generations) if len(g)]
    todo.sort(key=lambda i: len(prompts[i]) + len(generations[i]))
    with torch.no_grad():
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo:lo + batch_size]
            seqs = [list(prompts[i]) + list(generations[i]) for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            target = torch.zeros(len(chunk), width, dtype=torch.bool)
            for j, (i, s) in enumerate(zip(chunk, seqs, strict=True)):
                ids[j, width - len(s):] = torch.tensor(s)
                mask[j, width - len(s):] = 1
                target[j, width - len(generations[i]):] = True
            logits, _ = _model_forward(
                subject, ids, mask, _positions(mask), None, use_cache=False, last_only=False
            )
            logp = torch.log_softmax(logits[:, :-1].float(), -1).cpu()
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            tgt = target[:, 1:]
            mean = (nll * tgt).sum(1) / tgt.sum(1)
            out[chunk] = torch.exp(mean).double().numpy()
    return out


# --------------------------------------------------------------------------- strength choice
def select_strengths(
    table: pd.DataFrame,
    max_gen_success: float = ARAD_MAX_GEN_SUCCESS,
    *,
    on_empty: str = "skip",
) -> pd.DataFrame:
    """Arad's per-feature strength choice from a ``feature, strength, gen_success, perplexity``
    table (means over the selection prefixes, one row per feature × strength).

    Returns one row per feature: ``strength`` (NaN if every strength was filtered out),
    ``score`` (normalised GenSuccess / normalised perplexity at it) and ``n_eligible``.
    ``on_empty="raise"`` makes a feature without an eligible strength an error; with ``"skip"``
    only the case where *no* feature has one is (the strength grid is too strong).
    """
    need = {"feature", "strength", "gen_success", "perplexity"}
    if missing := need - set(table.columns):
        raise SteerscopeError(f"strength table lacks columns {sorted(missing)}", "pass them")
    if table.empty:
        raise SteerscopeError("the strength table is empty", "generate at least one strength")
    t = table.copy()
    gs_max = float(t["gen_success"].max())
    ppl_max = float(t["perplexity"].max(skipna=True))
    t["gs_norm"] = t["gen_success"] / gs_max if gs_max > 0 else 0.0
    t["ppl_norm"] = t["perplexity"] / ppl_max if np.isfinite(ppl_max) and ppl_max > 0 else np.nan
    t["score"] = t["gs_norm"] / t["ppl_norm"]
    t["eligible"] = (t["gen_success"] <= max_gen_success) & np.isfinite(t["score"])
    rows = []
    for feat, g in t.sort_values(["feature", "strength"]).groupby("feature", sort=True):
        ok = g[g["eligible"]]
        if ok.empty:
            rows.append({"feature": feat, "strength": np.nan, "score": np.nan, "n_eligible": 0})
            continue
        best = ok.iloc[int(np.argmax(ok["score"].to_numpy()))]
        rows.append({"feature": feat, "strength": float(best["strength"]),
                     "score": float(best["score"]), "n_eligible": len(ok)})
    sel = pd.DataFrame(rows)
    empty = sel["strength"].isna()
    if bool(empty.all()) or (on_empty == "raise" and bool(empty.any())):
        bad = sel.loc[empty, "feature"].tolist()
        raise SteerscopeError(
            f"every strength was filtered out (mean GenSuccess@20 > {max_gen_success:g}) for "
            f"{'all ' if bool(empty.all()) else ''}{len(bad)} feature(s); "
            f"GenSuccess by strength: {_describe(t, bad[:3])}",
            "add weaker strengths to the grid (e.g. 0.2 0.4 0.8)",
        )
    return sel


def _describe(t: pd.DataFrame, feats: list[Any]) -> str:
    parts = []
    for f in feats:
        g = t[t["feature"] == f].sort_values("strength")
        vals = ", ".join(f"{s:g}→{v:.2f}" for s, v in zip(g["strength"], g["gen_success"],
                                                          strict=True))
        parts.append(f"feature {f}: {vals}")
    return "; ".join(parts)
