"""Site statistics, the KL readout and bootstrap intervals for the sensitive-direction sweeps.

The baselines of Lee & Heimersheim (methods.md §3.1) are built from the distribution of real
activations at the perturbed site: their mean μ, their covariance Σ (plus 0.01·I, so that
``N(μ, Σ)`` is a proper distribution even where the data are degenerate) and their median norm
(the unit of the "relative" length axis). BOS is excluded: its residual norm is an outlier (about
3× the median in TinyStories-656K) that would dominate μ, Σ and every SAE statistic.

A sample covariance of ``N`` tokens has rank at most ``N − 1``; with ``N ≤ d_model`` the
0.01·I ridge alone would make cov-random samples live in an ``N − 1``-dimensional subspace plus
tiny noise, which is not what the baseline means. We refuse that case unless the user asks for
shrinkage (a fixed weight toward ``tr(S)/d · I`` or the Ledoit–Wolf weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from steerscope.errors import SteerscopeError

Shrinkage = float | Literal["auto"] | None


@dataclass
class SiteStats:
    """Statistics of real activations at one site (BOS excluded)."""

    site: str
    mean: torch.Tensor  # [d]
    cov: torch.Tensor  # [d, d], regularised: (shrunk) sample covariance + ridge·I
    median_norm: float
    n_tokens: int
    acts: torch.Tensor  # [N, d] the token activations: the pool of "real" directions
    ridge: float = 0.01
    shrinkage: float = 0.0
    _chol_cache: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def d(self) -> int:
        return int(self.mean.numel())

    def _chol(self) -> torch.Tensor:
        if self._chol_cache is None:
            self._chol_cache = torch.linalg.cholesky(self.cov.double()).to(self.cov.dtype)
        return self._chol_cache

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` draws from ``N(μ, Σ)`` (Cholesky; seeded through ``generator``)."""
        z = torch.randn(n, self.d, generator=generator, dtype=self.cov.dtype)
        return self.mean + z @ self._chol().T


def site_statistics(
    acts: torch.Tensor,
    site: str = "site",
    *,
    ridge: float = 0.01,
    shrinkage: Shrinkage = None,
    exclude_first: bool = True,
) -> SiteStats:
    """Mean, regularised covariance and median norm of activations ``[n, T, d]`` (or ``[N, d]``).

    ``exclude_first`` drops position 0 (BOS) of ``[n, T, d]`` input. ``shrinkage`` is ``None``
    (require a full-rank sample covariance), a weight in ``(0, 1]`` toward ``tr(S)/d · I``, or
    ``"auto"`` for the Ledoit–Wolf weight.
    """
    x = acts[:, 1:] if (acts.dim() == 3 and exclude_first) else acts
    x = x.reshape(-1, x.shape[-1]).detach().float().cpu()
    n, d = x.shape
    if not math.isfinite(ridge) or ridge < 0:
        raise SteerscopeError(f"covariance ridge {ridge} is not a non-negative number", "use 0.01")
    lam = _shrinkage_weight(x, site, shrinkage)
    xd = x.double()
    mean = xd.mean(0)
    centred = xd - mean
    sample_cov = centred.T @ centred / max(n - 1, 1)
    if lam > 0:
        target = torch.eye(d, dtype=torch.float64) * torch.trace(sample_cov) / d
        sample_cov = (1 - lam) * sample_cov + lam * target
    cov = sample_cov + ridge * torch.eye(d, dtype=torch.float64)
    return SiteStats(
        site=site, mean=mean.float(), cov=cov.float(),
        median_norm=float(np.median(x.norm(dim=-1).numpy())), n_tokens=n, acts=x, ridge=ridge,
        shrinkage=lam,
    )


def _shrinkage_weight(x: torch.Tensor, site: str, shrinkage: Shrinkage) -> float:
    n, d = x.shape
    if shrinkage is None:
        if n < d + 1:
            raise SteerscopeError(
                f"site {site} has {n} tokens (BOS excluded), too few for a full-rank "
                f"{d}×{d} covariance: at least {d + 1} are needed",
                "use more (or longer) statistics contexts, or pass shrinkage "
                "(--shrinkage auto for Ledoit–Wolf, or a weight in (0, 1])",
            )
        return 0.0
    if isinstance(shrinkage, str):
        if shrinkage != "auto":
            raise SteerscopeError(
                f"unknown shrinkage '{shrinkage}'", "use 'auto' or a number in (0, 1]"
            )
        if n < 2:
            raise SteerscopeError(
                f"site {site} has {n} token(s): no covariance can be estimated",
                "use at least 2 tokens (BOS excluded)",
            )
        from sklearn.covariance import ledoit_wolf_shrinkage

        return float(ledoit_wolf_shrinkage(x.double().numpy()))
    lam = float(shrinkage)
    if not (math.isfinite(lam) and 0.0 < lam <= 1.0):
        raise SteerscopeError(f"shrinkage {shrinkage} is not in (0, 1]", "use e.g. 0.1 or 'auto'")
    return lam


def kl_per_token(
    clean_logp: torch.Tensor, logits: torch.Tensor, clean_p: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(p_clean ‖ p_pert)`` over the last axis, from clean log-probs and perturbed logits.

    The clean side is passed as log-probabilities (and optionally their ``exp``) because it is
    computed once and reused for every perturbation. ``Σ p (log p − log q)`` directly, in
    float32: measured 6e-8 from a float64 reference, where the algebraically equal
    ``Σ p log p − Σ p·logits + logsumexp`` loses ~1e-6 to cancellation of terms of size ~20.
    """
    logq = torch.log_softmax(logits.float(), dim=-1)
    p = clean_logp.exp() if clean_p is None else clean_p
    return (p * (clean_logp - logq)).sum(-1)


def bootstrap_mean_ci(
    values: np.ndarray | torch.Tensor,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``values [n_contexts, tokens]`` and a percentile bootstrap CI over contexts.

    Tokens of one context are not independent (they share a prefix and, in the all-position
    mode, each other's perturbations), so whole contexts are resampled: a cluster bootstrap.
    Every context has the same number of tokens, so the token mean is the mean of context
    means. A 1-D input is one token per context.
    """
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values,
                   dtype=np.float64)
    per_ctx = v.reshape(v.shape[0], -1).mean(axis=1)
    mean = float(per_ctx.mean())
    if per_ctx.size < 2 or n_boot < 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, per_ctx.size, size=(n_boot, per_ctx.size))
    boot = per_ctx[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)


def check_lengths(lengths: object) -> tuple[float, ...]:
    """Perturbation lengths as a tuple of positive finite floats (else a SteerscopeError)."""
    try:
        vals = tuple(float(v) for v in lengths)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise SteerscopeError(
            f"lengths {lengths!r} are not numbers", "pass e.g. 0.1,0.2,0.5"
        ) from None
    if not vals:
        raise SteerscopeError("no perturbation lengths given", "pass e.g. 0.1,0.2,0.5")
    bad = [v for v in vals if not (math.isfinite(v) and v > 0)]
    if bad:
        raise SteerscopeError(
            f"perturbation lengths must be positive and finite, got {', '.join(map(str, bad))}",
            "pass lengths > 0 such as 0.1,0.2,0.5",
        )
    return vals
