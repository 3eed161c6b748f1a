"""What each feature's decoder direction does to the logits, read off the weights.

Two views, both chunked over features so ``d_sae x vocab`` (34 GB for 131K x 256K) is never
materialised:

* the **direct-logit footprint** (Duan §2.5): ``r_f = W_dec[f] @ W_U`` with no final norm, and
  the shape of ``|r_f|`` -- L2, L-inf, entropy, effective vocabulary, top-k mass fractions;
* the **logit lens** (Arad Eq. 4): ``W_U^T LN_f(W_dec[f])`` through the model's final norm and
  LM head; its top-20 tokens are the feature's "representative set" used by both Arad scores.
  Gemma's final soft-cap is monotone, so it is skipped (the top-k is unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from steerscope.subject import Subject

DIRECT_TOPK = (10, 50, 100, 500)


def direct_logit_footprint(
    W_dec: torch.Tensor,
    W_U: torch.Tensor,
    *,
    ks: Sequence[int] = DIRECT_TOPK,
    chunk: int | None = None,
    memory_mb: float = 256.0,
) -> dict[str, np.ndarray]:
    """Footprint columns for the decoder rows ``W_dec [n, d]`` given ``W_U [d, vocab]``.

    ``top{k}`` is clipped to the vocabulary size (the column keeps its name).
    """
    W_dec = W_dec.detach().float()
    W_U = W_U.detach().float()
    n, vocab = W_dec.shape[0], W_U.shape[1]
    chunk = chunk or max(1, int(memory_mb * 2**20 // (vocab * 4 * 3)))
    out = {name: np.empty(n) for name in (
        "direct_logit_l2", "direct_logit_linf", "direct_logit_entropy",
        "direct_logit_effective_vocab", *(f"direct_top{k}_abs_mass_frac" for k in ks),
    )}
    kmax = min(max(ks), vocab) if ks else 0
    for lo in range(0, n, chunk):
        r = W_dec[lo:lo + chunk] @ W_U
        a = r.abs()  # float32 throughout (torch sums blockwise): H = log S - sum a log a / S
        total = a.sum(1).double()
        ent = torch.log(total) - torch.xlogy(a, a).sum(1).double() / total
        ent = torch.where(total > 0, ent, torch.full_like(ent, float("nan")))
        hi = lo + r.shape[0]
        out["direct_logit_l2"][lo:hi] = r.norm(dim=1).double().numpy()
        out["direct_logit_linf"][lo:hi] = a.max(1).values.double().numpy()
        out["direct_logit_entropy"][lo:hi] = ent.numpy()
        out["direct_logit_effective_vocab"][lo:hi] = ent.exp().numpy()
        if kmax:
            top = torch.cumsum(a.topk(kmax, dim=1).values.double(), 1) / total[:, None]
            for k in ks:
                out[f"direct_top{k}_abs_mass_frac"][lo:hi] = top[:, min(k, vocab) - 1].numpy()
    return out


def logit_lens_tokens(
    subject: Subject, W_dec: torch.Tensor, k: int = 20, *, memory_mb: float = 256.0
) -> torch.Tensor:
    """Top-``k`` logit-lens token ids ``[n, k]`` (best first) of the rows ``W_dec [n, d]``."""
    vocab = subject.vocab_size
    chunk = max(1, int(memory_mb * 2**20 // (vocab * 4 * 2)))
    out = torch.empty(W_dec.shape[0], min(k, vocab), dtype=torch.long)
    with torch.no_grad():
        for lo in range(0, W_dec.shape[0], chunk):
            rows = W_dec[lo:lo + chunk].to(device=subject.device, dtype=subject.dtype)
            logits = subject.lm_head(subject.final_norm(rows)).float()
            out[lo:lo + rows.shape[0]] = logits.topk(out.shape[1], dim=1).indices.cpu()
    return out
