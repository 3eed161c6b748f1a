"""Decoder geometry per feature: norms, encoder-decoder alignment and decoder crowding.

Crowding (Duan §2.5) is each decoder direction's |cosine| to the *other* decoder rows: max,
top-20 mean and top-20 sum. The similarity matrix is ``d_sae x d_sae`` (64 GB at 131K), so it
is computed in tiles of ``rows x cols`` and only a running top-k per row survives a tile. The
peak extra memory is one tile plus ``rows x 2k`` -- independent of d_sae beyond W_dec itself.
"""

from __future__ import annotations

import numpy as np
import torch


def decoder_geometry(
    W_enc: torch.Tensor,
    W_dec: torch.Tensor,
    rows: slice | None = None,
    *,
    k: int = 20,
    row_chunk: int = 1024,
    col_chunk: int = 16384,
) -> dict[str, np.ndarray]:
    """Geometry columns for the features ``rows`` (default all).

    ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``. A zero decoder row has cosine 0 to every
    other row; a zero encoder or decoder row has NaN encoder-decoder cosine.
    """
    W_dec = W_dec.detach().float()
    W_enc = W_enc.detach().float()
    d_sae = W_dec.shape[0]
    rows = rows or slice(0, d_sae)
    idx = torch.arange(d_sae)[rows]
    dec = W_dec[idx]
    enc = W_enc[:, idx].T
    dec_norm = dec.norm(dim=1)
    enc_norm = enc.norm(dim=1)
    denom = dec_norm * enc_norm
    cos = torch.where(denom > 0, (dec * enc).sum(1) / denom.clamp(min=1e-30),
                      torch.full_like(denom, float("nan")))
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-30)
    kk = min(k, d_sae - 1)
    top = torch.empty(len(idx), max(kk, 0))
    for lo in range(0, len(idx), row_chunk):
        r = idx[lo:lo + row_chunk]
        block = unit[r]
        best = torch.empty(len(r), 0)
        for c0 in range(0, d_sae, col_chunk):
            sims = (block @ unit[c0:c0 + col_chunk].T).abs_()
            own = (r >= c0) & (r < c0 + sims.shape[1])
            sims[own.nonzero()[:, 0], (r[own] - c0)] = -1.0  # exclude j == f
            cand = torch.cat([best, sims.topk(min(kk, sims.shape[1]), dim=1).values], 1)
            best = cand.topk(min(kk, cand.shape[1]), dim=1).values
        top[lo:lo + row_chunk] = best[:, :kk]
    return {
        "decoder_norm": dec_norm.double().numpy(),
        "encoder_norm": enc_norm.double().numpy(),
        "encoder_decoder_cos": cos.double().numpy(),
        "crowding_max_abs_cos": (top[:, 0] if kk else torch.full((len(idx),), np.nan))
        .double().numpy(),
        "crowding_topk_mean_abs_cos": top.mean(1).double().numpy() if kk
        else np.full(len(idx), np.nan),
        "crowding_topk_sum_abs_cos": top.sum(1).double().numpy() if kk
        else np.full(len(idx), np.nan),
    }
