"""Arad et al.'s input and output scores (methods.md §1.2-1.3) for every feature.

**Input score** ``S_in = |{t in T : t in l}| / |T|``: ``T`` holds, for each of the feature's
top-activating contexts (at most ``max_contexts`` = 100, as the authors' code), the token at the
position where the feature peaks; ``l`` is its top-20 logit-lens set. Instead of Neuronpedia's
records we rank our own corpus contexts, streamed by :class:`TopContexts` (a running top-k per
feature, O(d_sae x k) memory), and we use the token ids directly -- no decode / re-tokenize
round trip (a defect listed in §1.8). Fewer than ``min_contexts`` firing contexts (the paper's
20; the code's 10) gives NaN and a reason.

**Output score** ``S_out = (1 - r(l*)/|V|) p(l*)`` after amplifying the feature at the last
position of a neutral prompt: ``a[f] += factor * max_j a[j]``, decoded with the SAE error kept.
Because the decoder is affine, that edit is exactly ``x_last += factor * a_max * W_dec[f]``
(the error term cancels), so all features are scored as many rows of ONE cached prompt through
the batched engine (:class:`steerscope.engine.CleanPrefix`): each row replays only the last
token with its own residual delta, instead of one full forward per feature. SAEs whose decode is
not affine in the code (activation normalisation that rescales the output) take the general
path ``decode(a') + (x - decode(a))`` per row, in feature chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from steerscope.errors import SteerscopeError
from steerscope.saes import SAE
from steerscope.subject import Subject

DEFAULT_PROMPT = "From my experience,"
DEFAULT_FACTOR = 10.0


class TopContexts:
    """Each feature's ``k`` highest-activating contexts, merged batch by batch.

    A context's activation is the feature's max over its positions; the token kept is the one
    at that position (the first one on ties). Ranking ties go to the lower context index (the
    merge is a stable sort of [kept, new] with contexts arriving in increasing order), so the
    result does not depend on how the corpus is cut into batches.
    """

    def __init__(self, d_sae: int, k: int = 100, threshold: float = 1e-6) -> None:
        self.d_sae, self.k, self.threshold = d_sae, int(k), float(threshold)
        self.values = torch.full((d_sae, self.k), -math.inf, dtype=torch.float32)
        # int32: 12 bytes per slot, 157 MB for 131K features x 100 contexts.
        self.context = torch.full((d_sae, self.k), -1, dtype=torch.int32)
        self.token = torch.full((d_sae, self.k), -1, dtype=torch.int32)
        self.n_contexts = torch.zeros(d_sae, dtype=torch.int64)  # firing contexts seen

    def update(
        self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
        row_context: torch.Tensor, row_token: torch.Tensor,
    ) -> None:
        """Merge one batch of FIRING entries ``(rows, cols, vals)``; row ``i`` lies in context
        ``row_context[i]`` (non-decreasing) and holds token ``row_token[i]``.

        Only features for which some new context beats the current k-th value are re-sorted,
        so after the first ``k`` contexts a batch touches few rows.
        """
        if rows.numel() == 0:
            return
        ctx0 = int(row_context[0])
        n_ctx = int(row_context[-1]) - ctx0 + 1
        key = cols * n_ctx + (row_context[rows] - ctx0)  # feature-major [d_sae, n_ctx]
        # One scatter finds both the max and the first row holding it: firing values are
        # positive, so their float bits order like the values; the low 32 bits rank rows.
        low = (1 << 32) - 1
        packed = (vals.float().view(torch.int32).long() << 32) | (low - rows)
        best = torch.full((self.d_sae * n_ctx,), -1, dtype=torch.int64)
        best.scatter_reduce_(0, key, packed, reduce="amax")
        best = best.view(self.d_sae, n_ctx)
        fired = best >= 0
        cand = torch.where(fired, (best >> 32).to(torch.int32).view(torch.float32),
                           torch.full(best.shape, -math.inf))
        self.n_contexts += fired.sum(1)
        beat = (cand > self.values[:, -1:]).any(1).nonzero()[:, 0]
        if beat.numel() == 0:
            return
        first = low - (best[beat] & low)
        ok = fired[beat]
        tok = torch.full(first.shape, -1, dtype=torch.int32)
        tok[ok] = row_token[first[ok]].to(torch.int32)
        ctx = torch.arange(ctx0, ctx0 + n_ctx, dtype=torch.int32).expand(len(beat), -1)
        ctx = torch.where(ok, ctx, torch.full_like(ctx, -1))
        vals_all = torch.cat([self.values[beat], cand[beat]], 1)
        order = torch.sort(vals_all, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values[beat] = vals_all.gather(1, order)
        self.context[beat] = torch.cat([self.context[beat], ctx], 1).gather(1, order)
        self.token[beat] = torch.cat([self.token[beat], tok], 1).gather(1, order)

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values, "context": self.context, "token": self.token,
                "n_contexts": self.n_contexts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("values", "context", "token", "n_contexts"):
            setattr(self, key, state[key])


def input_scores(
    top_tokens: torch.Tensor, n_firing: torch.Tensor, lens_tokens: torch.Tensor,
    min_contexts: int = 20, max_contexts: int = 100,
) -> dict[str, np.ndarray]:
    """``input_score``, ``input_score_n_contexts`` and ``input_score_reason`` per feature.

    ``top_tokens [n, >=max_contexts]`` are the peak tokens of each feature's contexts, best
    first (-1 = none); ``n_firing [n]`` counts its firing contexts; ``lens_tokens [n, 20]``.
    """
    if min_contexts < 1 or max_contexts < min_contexts:
        raise SteerscopeError(
            f"input-score contexts {min_contexts}..{max_contexts} are not a valid range",
            "use e.g. --input-min-contexts 20 --input-max-contexts 100",
        )
    use = n_firing.clamp(max=max_contexts)
    toks = top_tokens[:, :max_contexts]
    valid = torch.arange(toks.shape[1])[None, :] < use[:, None]
    hit = (toks[:, :, None] == lens_tokens[:, None, :]).any(-1) & valid
    score = hit.sum(1).double() / use.clamp(min=1).double()
    ok = use >= min_contexts
    reason = np.array(
        [None if good else f"only {int(u)} firing contexts (need {min_contexts})"
         for good, u in zip(ok.tolist(), use.tolist(), strict=True)],
        dtype=object,
    )
    return {
        "input_score": torch.where(ok, score, torch.full_like(score, math.nan)).numpy(),
        "input_score_n_contexts": use.numpy().astype(np.int64),
        "input_score_reason": reason,
    }


def prompt_ids(subject: Subject, prompt: str | Sequence[int]) -> torch.Tensor:
    """``[1, T]`` ids of the neutral prompt: BOS + its tokens (as the corpus contexts)."""
    if isinstance(prompt, str):
        tok = subject.tokenizer
        if tok is None:
            raise SteerscopeError(
                "the model has no tokenizer to encode the neutral prompt",
                "pass the prompt as token ids",
            )
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
    else:
        ids = list(prompt)
    if len(ids) < 2:
        raise SteerscopeError(
            f"the neutral prompt {prompt!r} is too short", "use a prompt of at least one word"
        )
    return torch.tensor([ids], dtype=torch.long)


def rank_weighted_prob(probs: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Arad's ``(1 - r(l*)/|V|) p(l*)`` per row, with ``l*`` the most probable of ``tokens``.

    ``probs [m, V]``, ``tokens [m, k]``. ``r`` is the 0-based rank by descending probability,
    counted as the number of tokens strictly more probable (ties share the better rank).
    Returns (score, p*, rank, l*).
    """
    p_set = probs.gather(1, tokens)
    p_best, arg = p_set.max(1)
    best = tokens.gather(1, arg[:, None])[:, 0]
    rank = (probs > p_best[:, None]).sum(1)
    score = (1 - rank.double() / probs.shape[1]) * p_best.double()
    return score, p_best, rank, best


def _affine_decoder(sae: SAE) -> bool:
    """True when ``decode(a + c e_f) - decode(a) == c W_dec[f]`` (no output rescaling)."""
    norm = getattr(sae.module.cfg, "normalize_activations", "none")
    return norm in (None, "none", "expected_average_only_in")


def output_scores(
    subject: Subject,
    sae: SAE,
    lens_tokens: torch.Tensor,
    features: torch.Tensor | None = None,
    *,
    prompt: str | Sequence[int] = DEFAULT_PROMPT,
    factor: float = DEFAULT_FACTOR,
    memory_mb: float = 512.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Output scores of ``features`` (default all), batched over one cached prompt.

    ``lens_tokens [len(features), k]`` are each feature's logit-lens tokens. Columns:
    ``output_score`` (the authors' code: the post-intervention ``P``), ``output_score_clean``
    (``P`` of the unsteered prompt for the same token set), ``output_score_delta`` (the paper's
    ``S_out = P(steered) - P(clean)``) and ``output_score_token`` (``l*`` after steering).
    """
    from steerscope.engine import CleanPrefix

    if not math.isfinite(factor):
        raise SteerscopeError(f"steering factor {factor} is not finite", "use e.g. 10")
    site = sae.hook
    feats = torch.arange(sae.d_sae) if features is None else torch.as_tensor(features).long()
    lens_tokens = torch.as_tensor(lens_tokens).long()
    ids = prompt_ids(subject, prompt)
    prefix = CleanPrefix.build(subject, ids, capture=[site], memory_mb=memory_mb)
    x_last = prefix.clean_acts[site][0].float()
    a = sae.encode(x_last[None].to(sae.W_dec.dtype))[0]
    if a.is_sparse:
        a = a.to_dense()
    a_max = float(a.max())
    clean = torch.softmax(prefix.clean_logits[0].double(), -1)
    clean_sorted = torch.sort(clean).values
    amount = factor * a_max
    w_dec = sae.W_dec.detach()
    affine = _affine_decoder(sae)
    err = None if affine else (x_last.double() - sae.decode(a[None]).double()[0])
    m = len(feats)
    out = {k: np.empty(m) for k in ("output_score", "output_score_clean", "output_score_delta")}
    best_tok = np.empty(m, dtype=np.int64)
    # Rows per chunk: the engine's budget, and ours for the float64 probabilities.
    step = max(1, min(prefix.chunk_size(), int(memory_mb * 2**20 // (subject.vocab_size * 24))))
    zero = torch.zeros(1, dtype=torch.long)
    for lo in range(0, m, step):
        f = feats[lo:lo + step]
        if affine:
            delta = (amount * w_dec[f].double()).to(subject.dtype)
        else:
            a_new = a.repeat(len(f), 1)
            a_new[torch.arange(len(f)), f] += amount
            # SAELens keeps the input-norm statistics of the last encode for ONE decode, so
            # re-encode the prompt's last position to restore them (one row: they broadcast).
            sae.encode(x_last[None].to(sae.W_dec.dtype))
            steered = sae.decode(a_new).double() + err
            delta = (steered - x_last.double()).to(subject.dtype)
        logits, _ = prefix.replay(zero.expand(len(f)), site, delta)
        probs = torch.softmax(logits.double(), -1)
        tokens = lens_tokens[lo:lo + step]
        score, _, _, best = rank_weighted_prob(probs, tokens)
        # Clean P(M) for the same token sets: one distribution, so ranks by binary search.
        p_clean = clean[tokens].max(1).values
        rank = len(clean) - torch.searchsorted(clean_sorted, p_clean, right=True)
        c_score = (1 - rank.double() / len(clean)) * p_clean
        out["output_score"][lo:lo + len(f)] = score.numpy()
        out["output_score_clean"][lo:lo + len(f)] = c_score.numpy()
        best_tok[lo:lo + len(f)] = best.numpy()
        if progress is not None:
            progress(min(m, lo + step), m)
    out["output_score_delta"] = out["output_score"] - out["output_score_clean"]
    out["output_score_token"] = best_tok
    return out
