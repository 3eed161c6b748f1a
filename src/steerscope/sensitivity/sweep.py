"""The length sweeps: every direction family × length × run → one row of KL and L2 with CIs.

A *run* is one independent draw of the random directions (a new seed); deterministic families
(SAE errors, plain substitutions, ablations) get one run. For each (family, run) the unit
directions are drawn once, per perturbed token, and reused at every length — the paper's
protocol, so a curve is one set of directions pushed further, not fresh noise at each point.

Lengths are given in absolute residual-stream units or relative to the site's median token norm;
the table carries both (``length_abs``, ``length_rel``), so curves of models with very different
activation scales can be compared on the relative axis without a second sweep.

Position policies: ``all`` perturbs every position except BOS (it is excluded from the
statistics and SAE training, and as the attention sink it would couple all positions) and reads
KL at every perturbed position; ``last`` perturbs and reads the last position only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch

from steerscope.errors import SteerscopeError
from steerscope.saes import SAE
from steerscope.sensitivity.directions import (
    BASE_FAMILIES,
    DETERMINISTIC,
    SAE_FAMILIES,
    SUBSTITUTIONS,
    FeatureCategories,
    base_directions,
    error_directions,
    feature_categories,
    feature_directions,
    panel_of,
    reconstruct_batched,
    substitute,
    unit,
)
from steerscope.sensitivity.runner import (
    DEFAULT_BATCH_TOKENS,
    AllPositionsRunner,
    LastPositionRunner,
)
from steerscope.sensitivity.stats import (
    Shrinkage,
    SiteStats,
    bootstrap_mean_ci,
    check_lengths,
    site_statistics,
)
from steerscope.subject import Subject

DEFAULT_SITE = "blocks.0.hook_resid_post"
DEFAULT_LENGTHS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0)
"""Relative to the median norm; the paper's normal grid 1…91 at median norm 121 spans
0.008–0.75, its extrapolation grid up to 1.7."""

POSITIONS = ("all", "last")
UNITS = ("relative", "absolute")

Progress = Callable[[int, int], None]

TABLE_COLUMNS = (
    "positions", "panel", "family", "sae", "sae_architecture", "sae_l0", "run", "unit", "length",
    "length_abs", "length_rel", "kl_mean", "kl_lo", "kl_hi", "l2_mean", "l2_lo", "l2_hi",
    "delta_norm", "cos_minus_x", "n_contexts", "n_tokens",
)


@dataclass(frozen=True)
class SensitivityConfig:
    """What to sweep and how (defaults: the embedded-model protocol of ``steerscope sensitivity``).

    ``families``: difference/mixture baselines; ``sae_families``: feature categories and error
    directions, per SAE; ``substitutions``: substitution tests, per SAE. ``level`` is the
    bootstrap CI level, ``n_boot`` its resamples (over contexts).
    """

    lengths: tuple[float, ...] = DEFAULT_LENGTHS
    unit: str = "relative"
    positions: tuple[str, ...] = ("all",)
    runs: int = 2
    families: tuple[str, ...] = BASE_FAMILIES
    sae_families: tuple[str, ...] = SAE_FAMILIES
    substitutions: tuple[str, ...] = SUBSTITUTIONS
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    ridge: float = 0.01
    shrinkage: Shrinkage = None
    alive_threshold: float = 1e-8
    batch_tokens: int = DEFAULT_BATCH_TOKENS

    def validated(self) -> SensitivityConfig:
        """This config with lengths checked; raises SteerscopeError on bad input."""
        lengths = check_lengths(self.lengths)
        if self.unit not in UNITS:
            raise SteerscopeError(f"unknown length unit '{self.unit}'", "use relative or absolute")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise SteerscopeError(
                f"unknown position policy {', '.join(bad) or '(none)'}", "use all, last or both"
            )
        if self.runs < 1:
            raise SteerscopeError(f"runs = {self.runs} is not positive", "use at least 1 run")
        if not 0.0 < self.level < 1.0:
            raise SteerscopeError(f"CI level {self.level} is not in (0, 1)", "use e.g. 0.95")
        for fam in (*self.families, *self.sae_families, *self.substitutions):
            panel_of(fam)
        return SensitivityConfig(**{**asdict(self), "lengths": lengths})


@dataclass
class SAEInfo:
    """One SAE as it entered the sweep."""

    name: str
    architecture: str
    l0: float
    n_active: int
    n_inactive: int
    n_dead: int
    d_sae: int


@dataclass
class SensitivityResult:
    """The table and what is needed to interpret it."""

    table: pd.DataFrame
    site: str
    median_norm: float
    n_stats_tokens: int
    shrinkage: float
    saes: list[SAEInfo]
    config: SensitivityConfig
    skipped: list[str] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "median_norm": self.median_norm,
            "n_stats_tokens": self.n_stats_tokens,
            "shrinkage": self.shrinkage,
            "saes": [asdict(s) for s in self.saes],
            "config": asdict(self.config),
            "skipped": self.skipped,
        }


def _seed(base: int, *parts: object) -> int:
    return (base * 1_000_003 + zlib.crc32("|".join(map(str, parts)).encode())) % (2**63)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def capture_site(
    subject: Subject, ids: torch.Tensor, site: str, batch_tokens: int = DEFAULT_BATCH_TOKENS
) -> torch.Tensor:
    """Clean activations ``[n, T, d]`` at ``site`` (the forward stops at the site)."""
    step = max(1, batch_tokens // max(int(ids.shape[1]), 1))
    parts = [
        subject.capture(ids[i:i + step], [site])[site].float().cpu()
        for i in range(0, int(ids.shape[0]), step)
    ]
    return torch.cat(parts)


def check_saes(subject: Subject, saes: Sequence[SAE], site: str) -> None:
    """Every SAE must read this model at the perturbed site, under a distinct name (the table
    is keyed by it)."""
    names = [sae.name for sae in saes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SteerscopeError(
            f"several SAEs are named {', '.join(dupes)}", "give each SAE its own directory name"
        )
    for sae in saes:
        sae.check(subject)
        if sae.hook != site:
            raise SteerscopeError(
                f"SAE '{sae.name}' was trained at {sae.hook}, not at the perturbed site {site}",
                f"pass an SAE trained at {site}, or perturb its own site (--site {sae.hook})",
            )


@dataclass
class _Job:
    family: str
    sae: SAE | None
    run: int
    kind: str  # "sweep" | "substitution"


def run_sensitivity(
    subject: Subject,
    sweep_ids: torch.Tensor,
    stats_ids: torch.Tensor,
    site: str = DEFAULT_SITE,
    saes: Sequence[SAE] = (),
    config: SensitivityConfig | None = None,
    progress: Progress | None = None,
) -> SensitivityResult:
    """Sweep every configured family × length × run at ``site``; one table row each.

    ``stats_ids`` give μ, Σ, the median norm, the real-activation pool and the alive/dead split;
    ``sweep_ids`` are the perturbed contexts (keep them disjoint from ``stats_ids`` so "real"
    directions come from other text).
    """
    cfg = (config or SensitivityConfig()).validated()
    subject.site(site)
    check_saes(subject, saes, site)
    stats_acts = capture_site(subject, stats_ids, site, cfg.batch_tokens)
    stats = site_statistics(stats_acts, site, ridge=cfg.ridge, shrinkage=cfg.shrinkage)
    del stats_acts
    sweep_acts = capture_site(subject, sweep_ids, site, cfg.batch_tokens)
    tokens = sweep_acts[:, 1:].reshape(-1, subject.d_model)
    cats: dict[str, FeatureCategories] = {}
    infos: list[SAEInfo] = []
    for sae in saes:
        c = feature_categories(sae, stats.acts, tokens, cfg.alive_threshold)
        cats[sae.name] = c
        infos.append(SAEInfo(sae.name, sae.architecture, c.l0, int(c.active.numel()),
                             int(c.inactive.numel()), int(c.dead.numel()), sae.d_sae))
    jobs, skipped = _jobs(cfg, saes, cats)
    total = len(jobs) * len(cfg.positions)
    done = 0
    rows: list[dict[str, Any]] = []
    for positions in cfg.positions:
        sweeper = _Sweeper(subject, sweep_ids, site, stats, cfg, positions, cats)
        for job in jobs:
            rows.extend(sweeper.run(job))
            done += 1
            if progress is not None:
                progress(done, total)
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return SensitivityResult(table, site, stats.median_norm, stats.n_tokens, stats.shrinkage,
                             infos, cfg, skipped)


def _jobs(
    cfg: SensitivityConfig, saes: Sequence[SAE], cats: dict[str, FeatureCategories]
) -> tuple[list[_Job], list[str]]:
    jobs: list[_Job] = []
    skipped: list[str] = []

    def runs(family: str) -> range:
        return range(1 if family in DETERMINISTIC else cfg.runs)

    for fam in cfg.families:
        jobs += [_Job(fam, None, r, "sweep") for r in runs(fam)]
    for sae in saes:
        for fam in cfg.sae_families:
            if fam != "sae_error" and cats[sae.name].get(fam.removeprefix("sae_")).numel() == 0:
                skipped.append(f"{sae.name}: no {fam.removeprefix('sae_')} features")
                continue
            jobs += [_Job(fam, sae, r, "sweep") for r in runs(fam)]
        for test in cfg.substitutions:
            jobs += [_Job(test, sae, r, "substitution") for r in runs(test)]
    return jobs, skipped


class _Sweeper:
    """One position policy: the runner, the clean activations at the perturbed positions."""

    def __init__(
        self, subject: Subject, ids: torch.Tensor, site: str, stats: SiteStats,
        cfg: SensitivityConfig, positions: str, cats: dict[str, FeatureCategories],
    ) -> None:
        self.cfg, self.stats, self.positions, self.cats = cfg, stats, positions, cats
        self.site = site
        self.runner: AllPositionsRunner | LastPositionRunner
        if positions == "all":
            self.runner = AllPositionsRunner(subject, ids, site, batch_tokens=cfg.batch_tokens)
            clean = self.runner.clean_site  # [n, T, d]
            self.n, self.per_ctx = clean.shape[0], clean.shape[1] - 1
            self.x = clean[:, 1:].reshape(-1, clean.shape[-1])
        else:
            self.runner = LastPositionRunner(subject, ids, site)
            self.n, self.per_ctx = self.runner.n, 1
            self.x = self.runner.clean_site
        self.scale = stats.median_norm if cfg.unit == "relative" else 1.0
        self._recon: dict[str, torch.Tensor] = {}

    def recon(self, sae: SAE) -> torch.Tensor:
        if sae.name not in self._recon:
            self._recon[sae.name] = reconstruct_batched(sae, self.x)
        return self._recon[sae.name]

    def run(self, job: _Job) -> list[dict[str, Any]]:
        seed = _seed(self.cfg.seed, self.positions, job.family,
                     job.sae.name if job.sae else "", job.run)
        g = _generator(seed)
        base = {
            "positions": self.positions, "panel": panel_of(job.family), "family": job.family,
            "sae": job.sae.name if job.sae else "",
            "sae_architecture": job.sae.architecture if job.sae else "",
            "sae_l0": self.cats[job.sae.name].l0 if job.sae else math.nan,
            "run": job.run, "unit": self.cfg.unit, "n_contexts": self.n,
            "n_tokens": self.n * self.per_ctx,
        }
        if job.kind == "substitution":
            assert job.sae is not None
            new = substitute(job.family, self.x, self.recon(job.sae), self.stats, g)
            kl, l2 = self._evaluate([new])
            delta = float((new - self.x).norm(dim=-1).mean())
            return [self._row(base, kl[0], l2[0], seed, math.nan, math.nan, delta)]
        u = self._directions(job, g)
        cos_minus_x = float(-(u * unit(self.x)).sum(-1).mean())
        rows = []
        step = max(1, self.cfg.batch_tokens // max(self.n * (self.per_ctx + 1), 1))
        for lo in range(0, len(self.cfg.lengths), step):
            chunk = self.cfg.lengths[lo:lo + step]
            kl, l2 = self._evaluate([self.x + (length * self.scale) * u for length in chunk])
            for i, length in enumerate(chunk):
                rows.append(self._row(base, kl[i], l2[i], seed + lo + i, length, cos_minus_x))
        return rows

    def _directions(self, job: _Job, g: torch.Generator) -> torch.Tensor:
        if job.sae is None:
            return base_directions(job.family, self.x, self.stats, g)
        if job.family == "sae_error":
            return error_directions(job.sae, self.x, self.recon(job.sae))
        feats = self.cats[job.sae.name].get(job.family.removeprefix("sae_"))
        return feature_directions(job.sae, feats, self.x.shape[0], g)[0]

    def _evaluate(self, news: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """KL and L2 ``[k, n, per_ctx]`` for ``k`` replacement sets of the perturbed tokens."""
        k = len(news)
        ctx = torch.arange(self.n).repeat(k)
        if isinstance(self.runner, AllPositionsRunner):
            clean = self.runner.clean_site
            site = clean.unsqueeze(0).repeat(k, 1, 1, 1)
            site[:, :, 1:] = torch.stack(news).reshape(k, self.n, self.per_ctx, -1)
            kl, l2 = self.runner.evaluate(site.reshape(k * self.n, *clean.shape[1:]), ctx)
            return kl[:, 1:].reshape(k, self.n, -1), l2[:, 1:].reshape(k, self.n, -1)
        delta = torch.cat([new - self.x for new in news])
        kl, l2 = self.runner.evaluate(delta, ctx)
        return kl.reshape(k, self.n, 1), l2.reshape(k, self.n, 1)

    def _row(
        self, base: dict[str, Any], kl: torch.Tensor, l2: torch.Tensor, seed: int,
        length: float, cos_minus_x: float, delta: float | None = None,
    ) -> dict[str, Any]:
        """One table row; ``length`` is in the configured unit (NaN for substitutions)."""
        kw = {"n_boot": self.cfg.n_boot, "level": self.cfg.level, "seed": seed % (2**32)}
        km, klo, khi = bootstrap_mean_ci(kl, **kw)
        lm, llo, lhi = bootstrap_mean_ci(l2, **kw)
        median = self.stats.median_norm
        relative = self.cfg.unit == "relative"
        length_abs = length * median if relative else length
        rel = length if relative else length / median
        delta = length_abs if delta is None else delta
        return {
            **base, "length": length, "length_abs": length_abs, "length_rel": rel,
            "kl_mean": km, "kl_lo": klo, "kl_hi": khi, "l2_mean": lm, "l2_lo": llo, "l2_hi": lhi,
            "delta_norm": delta, "cos_minus_x": cos_minus_x,
        }
