"""Statistics helpers shared by the screening stages: fast bootstrap ranks, correlation matrices,
p and q values, percentile CIs, and JSON-safe conversion.

Kept apart from :mod:`.evaluation` because held-out screening and the all-feature screen use them
too, and because they are the performance-critical core: a thousand bootstrap Spearman matrices
over hundreds of features must take seconds on a shared 2-core machine.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from scipy import stats
from threadpoolctl import threadpool_limits

F = TypeVar("F", bound=Callable[..., Any])

def dense_ranks(a: np.ndarray) -> np.ndarray:
    """Per-column dense ranks (0-based): equal values share a rank, so ties survive resampling."""
    out = np.empty(a.shape, dtype=np.int64)
    for j in range(a.shape[1]):
        _, inv = np.unique(a[:, j], return_inverse=True)
        out[:, j] = inv.reshape(-1)
    return out


def resample_ranks(dense: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Average (tie-aware) ranks of the resample ``idx`` from precomputed dense ranks.

    Equivalent to ``scipy.stats.rankdata(x[idx], axis=0)`` but O(n) per column with one
    ``bincount``: a resampled value's average rank is the count of smaller resampled values
    plus half its own multiplicity. That makes a thousand bootstrap Spearmans cheap.
    """
    d = dense[idx]
    n_src = dense.shape[0]
    k = d.shape[1]
    flat = d + np.arange(k)[None, :] * n_src
    counts = np.bincount(flat.ravel(), minlength=k * n_src).reshape(k, n_src)
    cum = np.cumsum(counts, axis=1)
    avg = cum - (counts - 1) / 2.0
    return avg[np.arange(k)[None, :], d]


def corr_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``a`` with every column of ``b`` (NaN if flat)."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    na = np.sqrt((a * a).sum(axis=0))
    nb = np.sqrt((b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a.T @ b) / np.outer(na, nb)
    flat = (na < 1e-12 * max(1.0, float(np.abs(a).max(initial=0.0))))
    r[flat, :] = np.nan
    r[:, nb < 1e-12 * max(1.0, float(np.abs(b).max(initial=0.0)))] = np.nan
    return np.clip(r, -1.0, 1.0)


def p_value(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p of a correlation under the t approximation (as scipy's spearmanr)."""
    df = n - 2
    if df <= 0:
        return np.full_like(r, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / np.clip(1.0 - r * r, 1e-300, None))
    return 2.0 * stats.t.sf(np.abs(t), df)


def boot_idx(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield rng.integers(0, n, n)


def percentile_ci(boot: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    with np.errstate(all="ignore"), quiet_nan():
        return np.nanpercentile(boot, lo_q, axis=0), np.nanpercentile(boot, hi_q, axis=0)


class quiet_nan:  # noqa: N801 - a tiny context manager
    """Silence numpy's all-NaN-slice warnings (a constant column has no CI, that is all)."""

    def __enter__(self) -> None:
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)


def single_blas(fn: F) -> F:
    """Run ``fn`` with one BLAS thread: the matrices here are small (features × predictors), and
    on a shared 2-core machine a multi-threaded BLAS spends 100× longer synchronising than
    multiplying (measured: 20 ms vs 0.2 ms for an 800×60 by 800×12 product)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def mask_groups(finite: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Columns grouped by their pattern of finite rows: ``[(row_mask, column_indices)]``."""
    groups: dict[bytes, list[int]] = {}
    for j in range(finite.shape[1]):
        groups.setdefault(finite[:, j].tobytes(), []).append(j)
    return [(finite[:, cols[0]].copy(), np.asarray(cols)) for cols in groups.values()]


# =========================================================================== univariate

def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p values (NaN stays NaN)."""
    q = np.full_like(p, np.nan, dtype=float)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return q
    order = ok[np.argsort(p[ok])]
    m = ok.size
    adj = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    q[order] = np.clip(adj, 0, 1)
    return q


# =========================================================================== cross-validation

def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame → list of dicts with NaN/inf as None and numpy scalars as Python ones."""
    out = []
    for rec in df.to_dict(orient="records"):
        out.append({k: jsonable(v) for k, v in rec.items()})
    return out


def jsonable(v: Any) -> Any:
    """A value JSON (and browsers) accept: NaN and inf become None."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return [jsonable(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


