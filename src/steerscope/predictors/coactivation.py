"""Co-activation of every feature with a panel of the most frequent features, streamed.

Duan's co-activation predictors need ``C[f, j]`` = number of positions where feature ``f`` and
panel feature ``j`` both fire. The full ``d_sae x d_sae`` matrix is out of reach for 131K-wide
SAEs (64 GB in int32), so -- as in Duan's GPT-2 script -- ``j`` ranges over a panel of the
``panel_size`` most frequent features: memory is ``d_sae x panel`` int32 counters (1 GB at
131,072 x 2,048) and nothing else grows with the corpus.

Counting is a sparse product: for a batch with binary firing matrix ``B [n, d_sae]`` (CSR, ~L0
entries per row), ``C += B^T B[:, panel]`` costs O(sum over positions of L0 x L0_panel), which
scipy's CSR x CSR product does in compiled code; a dense ``B^T B`` would cost d_sae x panel per
position, hundreds of times more. Two savings on top: the output size is bounded from the
per-row counts (so scipy's separate "count the output" pass is skipped), and when the panel is
every feature ``C`` is symmetric, so features are cut into ``blocks`` ranges and only the
products ``B[:, block a]^T B[:, blocks >= a]`` are formed (~(1 + 1/blocks)/2 of the pairs); the
lower blocks are mirrored once at :meth:`Coactivation.finalize`.

Which features are "most frequent" is only known after seeing data. When ``d_sae <= panel_size``
the panel is every feature and exact. Otherwise the panel is chosen from the firing frequency of
the first ``warmup_tokens`` positions (ties to the lower index), whose sparse firing entries are
buffered (~L0 x warmup int32 pairs) and then counted, so the counts themselves cover every
position fed in; only the *choice* of panel uses the warm-up prefix. (The pipeline feeds every
k-th context, enough for ``coact_max_positions``; see ``CorpusStats``.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

try:  # scipy's compiled kernels; csr_todense ADDS into its output (toarray zeroes it first)
    from scipy.sparse._sparsetools import csr_matmat, csr_tocsc, csr_todense
except ImportError:  # pragma: no cover - a scipy without the private module
    csr_matmat = csr_tocsc = csr_todense = None


class _Product:
    """``out[rows] += A @ B`` for CSR int32 operands, with reusable output buffers."""

    def __init__(self) -> None:
        self.cj = np.empty(0, np.int32)
        self.cx = np.empty(0, np.int32)

    def add(
        self, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
        n_mid: int, n_col: int, bound: int, out: np.ndarray,
    ) -> None:
        """``a = (indptr, indices)`` is ``[n_row, n_mid]``, ``b`` is ``[n_mid, n_col]``; all
        values are 1. ``bound`` >= the product's non-zeros; ``out`` is ``[n_row, n_col]``."""
        ap, aj = a
        bp, bj = b
        n_row = len(ap) - 1
        if bound == 0 or n_row == 0:
            return
        if csr_matmat is None:  # pragma: no cover - public-API fallback
            am = sp.csr_matrix((np.ones(len(aj), np.int32), aj, ap), shape=(n_row, n_mid))
            bm = sp.csr_matrix((np.ones(len(bj), np.int32), bj, bp), shape=(n_mid, n_col))
            out += (am @ bm).toarray().astype(out.dtype)
            return
        size = min(bound, n_row * n_col)
        if len(self.cj) < size:
            self.cj = np.empty(size, np.int32)
            self.cx = np.empty(size, np.int32)
        cp = np.empty(n_row + 1, np.int32)
        ax = np.ones(len(aj), np.int32)
        bx = np.ones(len(bj), np.int32)
        csr_matmat(n_row, n_col, ap, aj, ax, bp, bj, bx, cp, self.cj, self.cx)
        csr_todense(n_row, n_col, cp, self.cj, self.cx, out)


def _indptr(rows: np.ndarray, n_rows: int) -> np.ndarray:
    ptr = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=ptr[1:])
    return ptr


def _transpose(ptr: np.ndarray, cols: np.ndarray, n_cols: int) -> tuple[np.ndarray, ...]:
    """CSR of ``B^T`` (rows = features, indices = positions) from CSR of binary ``B``."""
    n_rows = len(ptr) - 1
    if csr_tocsc is None:  # pragma: no cover - public-API fallback
        m = sp.csr_matrix((np.ones(len(cols), np.int32), cols, ptr), shape=(n_rows, n_cols))
        t = m.T.tocsr()
        return t.indptr.astype(np.int32), t.indices.astype(np.int32)
    tp = np.empty(n_cols + 1, np.int32)
    ti = np.empty(len(cols), np.int32)
    tx = np.empty(len(cols), np.int32)
    csr_tocsc(n_rows, n_cols, ptr, cols, np.ones(len(cols), np.int32), tp, ti, tx)
    return tp, ti


class Coactivation:
    """Running co-activation counts of every feature against a frequency panel."""

    def __init__(
        self, d_sae: int, panel_size: int = 2048, warmup_tokens: int = 131072,
        top_partners: int = 10, blocks: int = 4,
    ) -> None:
        self.d_sae = d_sae
        self.panel_size = min(int(panel_size), d_sae)
        self.warmup_tokens = int(warmup_tokens)
        self.top_partners = int(top_partners)
        self.n_fire = torch.zeros(d_sae, dtype=torch.int64)
        self.tokens = 0
        self.panel: torch.Tensor | None = None
        self.panel_pos: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.mirrored = False  # True once the skipped lower blocks are filled in
        n_blocks = max(1, min(int(blocks), d_sae))
        self.bounds = [round(i * d_sae / n_blocks) for i in range(n_blocks + 1)]
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._product = _Product()
        if self.panel_size == d_sae:
            self._fix_panel(torch.arange(d_sae))

    @property
    def symmetric(self) -> bool:
        """The panel is every feature in index order, so ``C`` is symmetric."""
        return self.panel is not None and len(self.panel) == self.d_sae

    # ------------------------------------------------------------------ updates
    def update(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> None:
        """Add ``n_rows`` positions whose firing latents are ``(rows, cols)`` (row-major)."""
        self.tokens += int(n_rows)
        self.n_fire.index_add_(0, cols, torch.ones_like(cols))
        if self.panel is None:
            self._buffer.append((rows.to(torch.int32), cols.to(torch.int32), int(n_rows)))
            if self.tokens >= self.warmup_tokens:
                self._choose_panel()
            return
        self._count(rows, cols, n_rows)

    def _choose_panel(self) -> None:
        """Panel = the most frequent features so far (stable: ties go to the lower index)."""
        order = torch.sort(self.n_fire, descending=True, stable=True).indices
        self._fix_panel(torch.sort(order[: self.panel_size]).values)
        buffer, self._buffer = self._buffer, []
        for rows, cols, n in buffer:
            self._count(rows.long(), cols.long(), n)

    def _fix_panel(self, panel: torch.Tensor) -> None:
        self.panel = panel.long()
        pos = np.full(self.d_sae, -1, dtype=np.int64)
        pos[self.panel.numpy()] = np.arange(len(self.panel))
        self.panel_pos = pos
        self.counts = np.zeros((self.d_sae, len(self.panel)), dtype=np.int32)

    def _count(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> None:
        assert self.panel_pos is not None and self.counts is not None
        if cols.numel() == 0:
            return
        if self.mirrored:
            raise RuntimeError("co-activation counts were finalized; no more updates")
        r = rows.numpy()
        c = cols.numpy().astype(np.int32)
        ptr = _indptr(r, n_rows)
        per_row = np.diff(ptr).astype(np.int64)
        tp, ti = _transpose(ptr, c, self.d_sae)
        if self.symmetric:
            for lo, hi in zip(self.bounds[:-1], self.bounds[1:], strict=True):
                a = (tp[lo:hi + 1] - tp[lo], ti[tp[lo]:tp[hi]])
                keep = c >= lo  # columns of this block and the ones after it
                bp = _indptr(r[keep], n_rows)
                # non-zeros <= sum over this block's entries of their row's kept length
                bound = int(np.dot(np.bincount(r[(c >= lo) & (c < hi)], minlength=n_rows),
                                   np.diff(bp).astype(np.int64)))
                self._product.add(a, (bp, c[keep]), n_rows, self.d_sae, bound,
                                  self.counts[lo:hi])
            return
        pc = self.panel_pos[c]
        keep = pc >= 0
        bp = _indptr(r[keep], n_rows)
        bound = int(np.dot(per_row, np.diff(bp).astype(np.int64)))
        self._product.add((tp, ti), (bp, pc[keep].astype(np.int32)), n_rows, len(self.panel),
                          bound, self.counts)

    def _mirror(self) -> None:
        """Fill the lower blocks skipped by the symmetric product: ``C[b, a] = C[a, b]^T``."""
        if self.mirrored or not self.symmetric or self.counts is None:
            return
        b = self.bounds
        for i in range(len(b) - 1):
            for j in range(i + 1, len(b) - 1):
                self.counts[b[j]:b[j + 1], b[i]:b[i + 1]] = (
                    self.counts[b[i]:b[i + 1], b[j]:b[j + 1]].T
                )
        self.mirrored = True

    # ------------------------------------------------------------------ results
    def finalize(
        self, features: np.ndarray | None = None, chunk: int = 2048
    ) -> dict[str, np.ndarray]:
        """``coact_count_mean``, ``coact_entropy_norm`` and top partners for ``features``.

        Self-pairs are excluded (Duan's script counts ``f`` as co-active with itself when it is
        in the panel, which adds 1 to panel members only -- an artefact of panel membership).
        A feature that never fires gets NaN; one that fires but never with a panel feature gets
        count 0 and entropy 0 (all its co-activation mass is "nowhere", i.e. not spread).
        """
        if self.panel is None:
            self._choose_panel()
        self._mirror()
        assert self.panel is not None and self.counts is not None and self.panel_pos is not None
        feats = np.arange(self.d_sae) if features is None else np.asarray(features, np.int64)
        n_panel = len(self.panel)
        k = min(self.top_partners, max(n_panel - 1, 0))
        count_mean = np.full(len(feats), np.nan)
        entropy = np.full(len(feats), np.nan)
        partners = np.empty(len(feats), dtype=object)
        partner_frac = np.empty(len(feats), dtype=object)
        panel = self.panel.numpy()
        norm = math.log(n_panel) if n_panel > 1 else math.nan
        for lo in range(0, len(feats), chunk):
            f = feats[lo:lo + chunk]
            c = torch.from_numpy(self.counts[f]).long()
            own = torch.from_numpy(self.panel_pos[f])
            members = (own >= 0).nonzero()[:, 0]
            c[members, own[members]] = 0
            total = c.sum(1).double()
            fires = self.n_fire[torch.from_numpy(f)].double()
            cf = c.double()
            # H(c / T) = log T - sum c log c / T
            with np.errstate(divide="ignore", invalid="ignore"):
                h = (torch.log(total) - torch.xlogy(cf, cf).sum(1) / total).numpy()
            ok = (fires > 0).numpy()
            tot = total.numpy()
            count_mean[lo:lo + chunk] = np.where(ok, tot / np.maximum(fires.numpy(), 1), np.nan)
            entropy[lo:lo + chunk] = np.where(ok, np.where(tot > 0, h / norm, 0.0), np.nan)
            # Unique keys (count, then lower panel position) make top-k exact and stable.
            keyed = c * n_panel + (n_panel - 1 - torch.arange(n_panel))
            top = keyed.topk(k, dim=1).indices if k else torch.empty(len(f), 0, dtype=torch.long)
            top_c = c.gather(1, top).numpy()
            keep = top_c > 0  # zero-count "partners" are not partners; counts are sorted
            cuts = np.cumsum(keep.sum(1))[:-1]
            frac = top_c / np.maximum(fires.numpy(), 1.0)[:, None]
            ids = np.split(panel[top.numpy()][keep].astype(np.int64), cuts)
            fracs = np.split(frac[keep], cuts)
            for i in range(len(f)):  # element-wise: equal-length arrays must not broadcast
                partners[lo + i] = ids[i]
                partner_frac[lo + i] = fracs[i]
        return {
            "coact_count_mean": count_mean,
            "coact_entropy_norm": entropy,
            "coact_top_partners": partners,
            "coact_top_partner_frac": partner_frac,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "n_fire": self.n_fire, "tokens": self.tokens, "panel": self.panel,
            "counts": None if self.counts is None else torch.from_numpy(self.counts),
            "mirrored": self.mirrored, "bounds": list(self.bounds), "buffer": list(self._buffer),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_fire = state["n_fire"]
        self.tokens = int(state["tokens"])
        self._buffer = list(state["buffer"])
        self.bounds = list(state["bounds"])
        if state["panel"] is not None:
            self._fix_panel(state["panel"])
            self.counts = state["counts"].numpy().copy()
        self.mirrored = bool(state["mirrored"])
