"""Direction families and substitution tests (Lee & Heimersheim, methods.md §3.2–3.4).

Every family returns one *unit* direction per perturbed token (``[N, d]``), so a sweep is
``x' = x + L·u`` for every length ``L``, with the same ``u`` at every length.

* **difference** (Heimersheim's original baselines): ``u = (y − x)/‖y − x‖`` toward a target
  ``y`` — isotropic (``y`` uniform on the sphere of the median norm), cov-random
  (``y ~ N(μ, Σ)``) or real (a random real activation). ``u`` contains ``−x``: these moves
  partly shrink the activation toward the origin, which confounds real-vs-random comparisons
  (the flaw the paper fixed).
* **mixture** (the improved baseline, independent of ``x``): isotropic ``v ~ N(0, I)``,
  cov-random ``y₁ − y₂`` with ``y₁, y₂ ~ N(μ, Σ)``, real ``a_i − a_j`` for random real
  activations ``i ≠ j``.
* **SAE feature directions**: the unit decoder row of a feature drawn uniformly per token from
  one category — active (fires on the sweep contexts), alive-but-inactive (fires on the
  statistics corpus, not on the sweep contexts) or dead (never fires), threshold 1e-8.
* **SAE error directions**: ``(SAE(x) − x)/‖SAE(x) − x‖`` (error extrapolation).

Substitution tests replace ``x`` itself (:func:`substitute`); the ε-preserving ones move ``x``
by exactly its own SAE error norm ``ε = ‖SAE(x) − x‖`` along a baseline direction, so
``KL(SAE(x))`` can be compared with a baseline of the same length.

Paper divergence, on purpose: the isotropic *difference* target is ``median_norm · z/‖z‖``
rather than the code's ``121 · z`` (whose norm is ``121·√d``, 28× the median in GPT-2), so all
three difference targets sit at a typical activation norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from steerscope.errors import SteerscopeError
from steerscope.saes import SAE
from steerscope.sensitivity.stats import SiteStats

DIFFERENCE_FAMILIES = ("isotropic_difference", "cov_difference", "real_difference")
MIXTURE_FAMILIES = ("isotropic", "cov_mixture", "real_mixture")
BASE_FAMILIES = DIFFERENCE_FAMILIES + MIXTURE_FAMILIES
FEATURE_CATEGORIES = ("active", "inactive", "dead")
SAE_FAMILIES = ("sae_active", "sae_inactive", "sae_dead", "sae_error")
SUBSTITUTIONS = (
    "substitution", "norm_corrected", "cos_corrected", "eps_isotropic", "eps_cov_mixture",
    "eps_real_mixture", "cos_preserving_sae_norm", "cos_preserving_true_norm", "zero_ablation",
    "mean_ablation",
)
DETERMINISTIC = frozenset({"sae_error", "substitution", "norm_corrected", "cos_corrected",
                           "zero_ablation", "mean_ablation"})
"""Families whose result does not depend on the random seed: one run is enough."""

_TINY = 1e-12


def panel_of(family: str) -> str:
    """The figure panel / table group of a family."""
    if family in DIFFERENCE_FAMILIES:
        return "difference"
    if family in MIXTURE_FAMILIES:
        return "mixture"
    if family == "sae_error":
        return "error"
    if family in SAE_FAMILIES:
        return "feature"
    if family in SUBSTITUTIONS:
        return "substitution"
    raise SteerscopeError(
        f"unknown direction family '{family}'",
        f"use one of {', '.join(BASE_FAMILIES + SAE_FAMILIES + SUBSTITUTIONS)}",
    )


def unit(v: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` scaled to unit norm."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def _random_rows(pool: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return pool[torch.randint(0, pool.shape[0], (n,), generator=g)]


def _resample_zero(
    v: torch.Tensor, redraw: Callable[[int, torch.Tensor], torch.Tensor], what: str
) -> torch.Tensor:
    """Redraw rows of ``v`` that are exactly zero (the paper drops them; we keep N fixed)."""
    for _ in range(100):
        zero = v.norm(dim=-1) <= _TINY
        if not bool(zero.any()):
            return v
        v = v.clone()
        v[zero] = redraw(int(zero.sum()), zero)
    raise SteerscopeError(
        f"cannot draw non-zero {what} directions: the real activations are all identical",
        "use more varied statistics contexts",
    )


def base_directions(
    family: str, x: torch.Tensor, stats: SiteStats, g: torch.Generator
) -> torch.Tensor:
    """Unit directions ``[N, d]`` of a difference or mixture family for activations ``x``."""
    n, d = x.shape
    pool = stats.acts
    if family == "isotropic":
        return unit(torch.randn(n, d, generator=g))
    if family == "cov_mixture":
        return unit(stats.sample(n, g) - stats.sample(n, g))
    if family == "real_mixture":
        def pairs(k: int, _rows: torch.Tensor | None = None) -> torch.Tensor:
            return _random_rows(pool, k, g) - _random_rows(pool, k, g)

        return unit(_resample_zero(pairs(n), pairs, "real-mixture"))
    if family == "isotropic_difference":
        y = stats.median_norm * unit(torch.randn(n, d, generator=g))
        return unit(y - x)
    if family == "cov_difference":
        return unit(stats.sample(n, g) - x)
    if family == "real_difference":
        def towards(k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
            xs = x if rows is None else x[rows]
            return _random_rows(pool, k, g) - xs

        return unit(_resample_zero(towards(n), towards, "real-difference"))
    raise SteerscopeError(
        f"unknown direction family '{family}'", f"use one of {', '.join(BASE_FAMILIES)}"
    )


# ---------------------------------------------------------------------------- SAE directions
@dataclass
class FeatureCategories:
    """Indices of an SAE's features by firing category, and its L0 on the statistics tokens."""

    active: torch.Tensor
    inactive: torch.Tensor
    dead: torch.Tensor
    l0: float

    def get(self, category: str) -> torch.Tensor:
        return {"active": self.active, "inactive": self.inactive, "dead": self.dead}[category]


def encode_batched(sae: SAE, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """SAE latents of ``x [N, d]`` in batches (float32, CPU)."""
    return torch.cat([sae.encode(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)])


def feature_categories(
    sae: SAE, stats_acts: torch.Tensor, sweep_acts: torch.Tensor, threshold: float = 1e-8
) -> FeatureCategories:
    """Active / alive-but-inactive / dead features (methods.md §3.4) and the SAE's L0.

    *Active* fires (> threshold) on some token of the sweep contexts; *alive* fires on some
    token of the statistics corpus or the sweep; *dead* never fires. L0 is the mean number of
    non-zero latents per statistics token.
    """
    fires_stats = torch.zeros(sae.d_sae, dtype=torch.bool)
    nnz = 0.0
    for i in range(0, len(stats_acts), 4096):
        a = encode_batched(sae, stats_acts[i:i + 4096])
        fires_stats |= (a > threshold).any(0)
        nnz += float((a != 0).sum())
    fires_sweep = (encode_batched(sae, sweep_acts) > threshold).any(0)
    alive = fires_stats | fires_sweep
    idx = torch.arange(sae.d_sae)
    return FeatureCategories(
        active=idx[fires_sweep], inactive=idx[alive & ~fires_sweep], dead=idx[~alive],
        l0=nnz / max(len(stats_acts), 1),
    )


def feature_directions(
    sae: SAE, features: torch.Tensor, n: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit decoder rows of ``n`` features drawn uniformly from ``features`` (and the draws)."""
    if features.numel() == 0:
        raise SteerscopeError("no features in this category", "choose another category")
    f = features[torch.randint(0, features.numel(), (n,), generator=g)]
    w = sae.W_dec.detach().float().cpu()
    return unit(w[f]), f


def reconstruct_batched(sae: SAE, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """``SAE(x)`` in batches (float32, CPU)."""
    return torch.cat(
        [sae.reconstruct(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)]
    )


def error_directions(sae: SAE, x: torch.Tensor, recon: torch.Tensor | None = None) -> torch.Tensor:
    """Unit SAE-error directions ``(SAE(x) − x)/‖SAE(x) − x‖``."""
    recon = reconstruct_batched(sae, x) if recon is None else recon
    return unit(recon - x)


# ---------------------------------------------------------------------------- substitutions
def substitute(
    test: str,
    x: torch.Tensor,
    recon: torch.Tensor,
    stats: SiteStats,
    g: torch.Generator,
) -> torch.Tensor:
    """The replacement ``x'`` of one substitution test (methods.md §3.3) for ``x [N, d]``.

    ``recon`` is ``SAE(x)``. ε-preserving tests move ``x`` by ``ε = ‖SAE(x) − x‖`` along an
    isotropic / cov-mixture / real-mixture direction; cos-preserving tests keep the angle of
    ``SAE(x)`` to ``x`` with a random orthogonal part, at the SAE's or the true norm.
    """
    eps = (recon - x).norm(dim=-1, keepdim=True)
    xn = x.norm(dim=-1, keepdim=True)
    rn = recon.norm(dim=-1, keepdim=True)
    if test == "substitution":
        return recon.clone()
    if test == "norm_corrected":
        return recon * xn / rn.clamp_min(_TINY)
    if test == "cos_corrected":
        return x * rn / xn.clamp_min(_TINY)
    if test in ("eps_isotropic", "eps_cov_mixture", "eps_real_mixture"):
        family = {"eps_isotropic": "isotropic", "eps_cov_mixture": "cov_mixture",
                  "eps_real_mixture": "real_mixture"}[test]
        return x + eps * base_directions(family, x, stats, g)
    if test in ("cos_preserving_sae_norm", "cos_preserving_true_norm"):
        xu = unit(x)
        cos = (unit(recon) * xu).sum(-1, keepdim=True).clamp(-1.0, 1.0)
        z = torch.randn(x.shape, generator=g)
        w = unit(z - (z * xu).sum(-1, keepdim=True) * xu)
        norm = rn if test.endswith("sae_norm") else xn
        return norm * (cos * xu + (1 - cos**2).clamp_min(0).sqrt() * w)
    if test == "zero_ablation":
        return torch.zeros_like(x)
    if test == "mean_ablation":
        return stats.mean.expand_as(x).clone()
    raise SteerscopeError(
        f"unknown substitution test '{test}'", f"use one of {', '.join(SUBSTITUTIONS)}"
    )
