"""Steering-modularity labels (Duan 2026; methods.md §2.2–2.4): what steering a feature really does.

For every feature ``f`` and strength ``α``: add ``α · W_dec[f]`` at the steering site on the
FINAL position of each of its contexts (top-16 / random-16 / low-16 by the feature's clean
final-token activation; "mixed" is their union), and measure the change of the final-position
logits ``Δℓ_c`` and of the downstream SAE's latents on a panel of its most frequent latents
``Δu_c``. One row per feature (per α when a strength grid is given):

* effect: ``effect_l2 = mean_c ‖Δℓ_c‖``, ``effect_cv = std_c ‖Δℓ_c‖ / mean_c ‖Δℓ_c‖``;
* stability: ``stability_signed/abs = mean_c (|)cos(Δℓ_c, mean Δℓ)(|)``,
  ``pairwise_signed/abs = mean_{c≠c'} (|)cos(Δℓ_c, Δℓ_c')(|)`` (effects of norm ≤ 1e-8 skipped);
* collateral: ``collateral_count_τ = mean_c #{j ∈ panel: |Δu_cj| > τ}`` for τ ∈ {0.01, 0.05,
  0.1}, ``collateral_per_effect = C_0.05 / (E + 1e-8)``, ``downstream_l2 = mean_c ‖Δu_c‖``,
  ``downstream_l2_per_effect``, ``effective_moved = mean_c exp H(|Δu_c| / Σ|Δu_c|)``;
* KL: ``kl = mean_c KL(clean ‖ steered)``, ``kl_reverse = mean_c KL(steered ‖ clean)``,
  ``kl_per_effect = kl / (E + 1e-8)``;
* nuisance: ``ctx_act_mean/max`` (the feature's natural activation over its contexts),
  ``n_contexts``, ``alpha``.

Mixed-context labels have plain names; ``__top`` / ``__random`` / ``__low`` suffixes give the
per-type ones. Formulas follow the author's GPT-2 script (unbiased std, 1e-8 validity cut-offs).

Defects of the reference pipeline avoided (methods.md §2.9 and reading its code): contexts never
end in a pad token (packed contexts, checked here); statistics are on the final position, where we
steer; ``effective_moved`` is the entropy count it claims to be (not the L2 the Llama script
stored); context choice is a pure function of (seed, feature) — the reference draws "random" from
one generator shared across features, so a feature's contexts depend on which features ran before
it — and ties in the ranking (the many zero activations of a sparse feature) are broken at random
per feature instead of by index, so "low-16" is not the same 16 contexts for every sparse feature;
``mixed`` is computed once and sliced into its types, where the reference re-ran the model per
type.

Speed: all interventions go through :class:`steerscope.engine.CleanPrefix` (one cached clean
prefix, then one token per (feature, context, α) triple), in blocks of features sized by the
memory budget; :func:`run_labels` writes resumable shards.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from steerscope.engine import CPU_TENSOR_BYTES, DEFAULT_MEMORY_MB, CleanPrefix
from steerscope.errors import SteerscopeError
from steerscope.interventions import check_feature, check_strengths
from steerscope.saes import SAE
from steerscope.subject import Subject

CONTEXT_TYPES = ("top", "random", "low")
ALL_TYPES = ("mixed", *CONTEXT_TYPES)
EPS = 1e-8
Progress = Callable[[str, float], None]
"""``progress(what, fraction_done)``: the library reports, the CLI draws."""


@dataclass(frozen=True)
class LabelOptions:
    """How labels are measured (everything that changes a number is here, and in the manifest).

    ``alphas``: the strength grid, in units of the raw decoder row (``unit=False``, Duan's
    convention) — ``"auto"`` is the GPT-2/Pythia scripts' rule, the median over features of
    ``max(q95_f, 1)``, taken here over every feature whose final-token firing rate lies in
    ``[0.002, 0.5]`` so that it does not depend on which features are labelled.
    """

    alphas: tuple[float, ...] | str = (1.0,)
    per_type: int = 16
    panel_size: int = 2048
    taus: tuple[float, ...] = (0.01, 0.05, 0.1)
    collateral_tau: float = 0.05
    seed: int = 0
    unit: bool = False
    active_threshold: float = 1e-6
    memory_mb: float = DEFAULT_MEMORY_MB


@dataclass
class LabelSetup:
    """The clean state every feature's labels are measured against, computed once."""

    subject: Subject
    sae: SAE
    downstream: SAE | None
    options: LabelOptions
    ids: torch.Tensor  # [n, T] the contexts
    alphas: list[float]
    primary: torch.Tensor  # [n, d_sae] clean final-token latents of the steering SAE (CPU fp32)
    clean_logits: torch.Tensor  # [n, vocab] (CPU fp32)
    panel: torch.Tensor | None  # [K] downstream latent ids (None: the panel is every latent)
    down_clean: torch.Tensor | None  # [n, K] clean final-token panel latents (CPU)
    prefix: CleanPrefix | None = field(default=None, repr=False)
    metric_dtype: torch.dtype = torch.float32
    clean_p: torch.Tensor = field(default_factory=lambda: torch.empty(0), repr=False)

    @property
    def n(self) -> int:
        return int(self.primary.shape[0])


# --------------------------------------------------------------------------- checks & setup
def check_sites(subject: Subject, sae: SAE, downstream: SAE | None) -> None:
    """Both SAEs read this model, and the downstream site comes after the steering site."""
    steer = sae.check(subject)
    if downstream is None:
        return
    down = downstream.check(subject)
    same_tensor = (steer.kind == "hook_resid_post" and down.kind == "hook_resid_pre"
                   and down.layer == steer.layer + 1)
    if down.order <= steer.order or same_tensor:
        raise SteerscopeError(
            f"downstream site '{downstream.hook}' is not after the steering site '{sae.hook}'",
            "pick a downstream SAE at a later hook (e.g. the next block's resid_post)",
        )


def check_features(sae: SAE, features: Sequence[int] | None) -> list[int]:
    """All features by default; each one in range; no duplicates (first occurrence kept)."""
    if features is None:
        return list(range(sae.d_sae))
    out = [check_feature(sae, f) for f in features]
    if not out:
        raise SteerscopeError("no features to label", "pass --features N or a list like 1,5,9")
    return list(dict.fromkeys(out))


def check_options(options: LabelOptions) -> None:
    if options.per_type < 1:
        raise SteerscopeError(f"contexts per type {options.per_type} < 1", "use e.g. 16")
    if options.panel_size < 1:
        raise SteerscopeError(f"panel size {options.panel_size} < 1", "use e.g. 2048")
    taus = check_strengths(options.taus, "collateral threshold")
    if any(t < 0 for t in taus):
        raise SteerscopeError("collateral thresholds must be ≥ 0", "use e.g. 0.01,0.05,0.1")
    if not isinstance(options.alphas, str):
        check_strengths(options.alphas, "strength")
    elif options.alphas != "auto":
        raise SteerscopeError(f"unknown strength '{options.alphas}'", "use numbers or 'auto'")
    if options.memory_mb <= 0:
        raise SteerscopeError(f"memory budget {options.memory_mb} MB is not positive", "use 512")


def check_contexts(ids: torch.Tensor, subject: Subject) -> torch.Tensor:
    """``[n, T ≥ 2]`` token ids whose steered (last) position is never padding."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise SteerscopeError(f"contexts have shape {tuple(ids.shape)}", "pass [n, length] ids")
    if ids.shape[1] < 2:
        raise SteerscopeError(
            f"contexts of {ids.shape[1]} token(s) are too short to steer the last position",
            "use --context-length 2 or more",
        )
    tok = subject.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    special = {getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)}
    if pad is not None and pad not in special and bool((ids[:, -1] == pad).any()):
        raise SteerscopeError(
            f"{int((ids[:, -1] == pad).sum())} contexts end in the pad token",
            "build contexts with steerscope.corpus (packed, no padding)",
        )
    return ids.long()


def prepare(
    subject: Subject,
    sae: SAE,
    downstream: SAE | None,
    ids: torch.Tensor,
    options: LabelOptions = LabelOptions(),
    *,
    build_prefix: bool = True,
) -> LabelSetup:
    """Clean pass over all contexts: the cached prefix, clean latents, the downstream panel, α."""
    check_options(options)
    check_sites(subject, sae, downstream)
    ids = check_contexts(ids, subject)
    sites = [sae.hook] + ([downstream.hook] if downstream is not None else [])
    prefix = None
    if build_prefix:
        prefix = CleanPrefix.build(subject, ids, capture=sites, memory_mb=options.memory_mb)
        logits, acts = prefix.clean_logits, prefix.clean_acts
    else:
        logits, acts = clean_full_forward(subject, ids, sites)
    return setup_from_clean(subject, sae, downstream, options, ids, logits, acts, prefix)


def clean_full_forward(
    subject: Subject, ids: torch.Tensor, sites: Sequence[str], batch_size: int = 16
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference clean pass: full forwards, keep the final position (batches of 16)."""
    logits_parts, acts_parts = [], {s: [] for s in sites}
    for lo in range(0, ids.shape[0], batch_size):
        logits, store, _ = subject.forward(ids[lo:lo + batch_size], capture=sites)
        assert logits is not None
        logits_parts.append(logits[:, -1])
        for s in sites:
            acts_parts[s].append(store[s][:, -1])
    return torch.cat(logits_parts), {s: torch.cat(v) for s, v in acts_parts.items()}


def setup_from_clean(
    subject: Subject,
    sae: SAE,
    downstream: SAE | None,
    options: LabelOptions,
    ids: torch.Tensor,
    logits: torch.Tensor,
    acts: dict[str, torch.Tensor],
    prefix: CleanPrefix | None = None,
) -> LabelSetup:
    """The setup from a clean pass (the engine's, or the reference full forwards).

    Labels are computed in float32 from whatever the model's dtype is: their inputs (logits and
    latents) carry at most float32 precision in normal use, and the ``[rows, vocab]`` passes are
    memory-bound, so float64 there would double the cost for nothing.
    """
    dt = torch.float32
    primary = _encode(sae, acts[sae.hook], dt)
    panel = down_clean = None
    if downstream is not None:
        down = _encode(downstream, acts[downstream.hook], dt)
        freq = (down > options.active_threshold).to(dt).mean(0)
        k = min(options.panel_size, downstream.d_sae)
        # most frequent first; ties by latent index (a stable sort), so the panel is reproducible
        panel = torch.sort(freq, descending=True, stable=True).indices[:k]
        if k == downstream.d_sae:
            panel = None  # every latent: no label depends on their order, skip the gather
            down_clean = down
        else:
            down_clean = down[:, panel].contiguous()
    alphas = _alphas(options, primary)
    clean = logits.to(device="cpu", dtype=dt)
    return LabelSetup(
        subject=subject, sae=sae, downstream=downstream, options=options, ids=ids, alphas=alphas,
        primary=primary, clean_logits=clean, panel=panel, down_clean=down_clean, prefix=prefix,
        metric_dtype=dt, clean_p=torch.softmax(clean, dim=-1),
    )


def _encode(
    sae: SAE, x: torch.Tensor, dtype: torch.dtype = torch.float32, chunk: int = 4096
) -> torch.Tensor:
    """SAE latents on CPU in ``dtype``, in chunks of rows."""
    return torch.cat(
        [sae.encode(x[i:i + chunk]).to(device="cpu", dtype=dtype) for i in range(0, len(x), chunk)]
    )


def _alphas(options: LabelOptions, primary: torch.Tensor) -> list[float]:
    if not isinstance(options.alphas, str):
        return check_strengths(options.alphas, "strength")
    freq = (primary > options.active_threshold).float().mean(0)
    band = (freq >= 0.002) & (freq <= 0.5)
    acts = primary[:, band] if bool(band.any()) else primary
    q95 = np.quantile(acts.numpy(), 0.95, axis=0)
    return [float(np.median(np.maximum(q95, 1.0)))]


# --------------------------------------------------------------------------- contexts
def select_contexts(acts: torch.Tensor, feature: int, per_type: int, seed: int) -> dict[str, Any]:
    """Top / random / low contexts of one feature by its clean final-token activation ``acts [n]``.

    One total order of the contexts — by activation, ties in a per-feature random order seeded
    by ``(seed, feature)`` — gives low-k (its start) and top-k (its end, highest first), so the
    two never overlap when ``n ≥ 2k`` even when most activations tie at zero. Random contexts
    come from the same generator, excluding top and low. The choice never depends on which other
    features are labelled, or in which order.
    """
    n = int(acts.shape[0])
    k = min(per_type, n)
    rng = np.random.default_rng([seed, feature])
    perm = rng.permutation(n)
    vals = acts.numpy()[perm] if isinstance(acts, torch.Tensor) else np.asarray(acts)[perm]
    order = perm[np.argsort(vals, kind="stable")]
    low = order[:k]
    top = order[::-1][:k]
    taken = np.zeros(n, dtype=bool)
    taken[top] = True
    taken[low] = True
    rest = np.flatnonzero(~taken)
    rand = rng.choice(rest, size=min(k, rest.size), replace=False) if rest.size else rest
    return {"top": top, "random": np.asarray(rand, dtype=np.int64), "low": low}


def context_rows(
    setup: LabelSetup, features: Sequence[int]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Context indices ``[F, C]`` per feature (top | random | low, padded) and type masks.

    ``mixed`` marks the first occurrence of each context (the union; types overlap only when
    there are fewer than ``3k`` contexts). Padding rows (context 0) belong to no type.
    """
    opts = setup.options
    primary = setup.primary.numpy()
    picks = [select_contexts(primary[:, f], f, opts.per_type, opts.seed) for f in features]
    width = max(sum(len(p[t]) for t in CONTEXT_TYPES) for p in picks)
    ctx = np.zeros((len(features), width), dtype=np.int64)
    masks = {t: np.zeros((len(features), width), dtype=bool) for t in ALL_TYPES}
    for i, p in enumerate(picks):
        j = 0
        for t in CONTEXT_TYPES:
            m = len(p[t])
            ctx[i, j:j + m] = p[t]
            masks[t][i, j:j + m] = True
            j += m
        first = np.unique(ctx[i, :j], return_index=True)[1]
        masks["mixed"][i, first] = True
    return torch.from_numpy(ctx), {t: torch.from_numpy(m) for t, m in masks.items()}


# --------------------------------------------------------------------------- metrics
def row_stats(
    steered: torch.Tensor,
    clean: torch.Tensor,
    clean_p: torch.Tensor,
    down_steered: torch.Tensor | None,
    down_clean: torch.Tensor | None,
    taus: Sequence[float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row effects: ``Δℓ [R, V]`` and the row statistics ``{name: [R]}``.

    KL without cancellation: with ``μ = Σ p_c Δℓ`` and ``x = Δℓ − μ``,
    ``KL(c‖s) = log(1 + Σ p_c expm1(x))`` and ``KL(s‖c) = Σ p_c e^x x / (1 + Σ p_c expm1(x)) −
    KL(c‖s)``. Subtracting log-sum-exps (~10) instead would leave float32 noise of ~1e-6, the
    size of the KL of a weak feature. Rows whose exponentials overflow (a shift of the logits
    beyond ~80 nats) fall back to the direct ``Σ p (log p − log q)``. The entropy of
    ``q = |Δu| / S`` is ``log S − Σ |Δu| log |Δu| / S`` (``0 log 0 = 0``: no movement gives
    ``exp H = 1``, as the reference's clamped version does up to 1e-8).
    """
    dl = steered - clean
    mu = (clean_p * dl).sum(-1, keepdim=True)
    x = dl - mu
    w = clean_p * torch.expm1(x)
    s1 = w.sum(-1)
    kl = torch.log1p(s1)
    kl_rev = ((clean_p * x).sum(-1) + (w * x).sum(-1)) / (1 + s1) - kl
    bad = ~(torch.isfinite(kl) & torch.isfinite(kl_rev))
    if bool(bad.any()):
        logp_c = torch.log_softmax(clean[bad], -1)
        logp_s = torch.log_softmax(steered[bad], -1)
        kl[bad] = (logp_c.exp() * (logp_c - logp_s)).sum(-1)
        kl_rev[bad] = (logp_s.exp() * (logp_s - logp_c)).sum(-1)
    stats = {"norm": dl.norm(dim=-1), "kl": kl, "kl_reverse": kl_rev}
    if down_steered is not None and down_clean is not None:
        # Downstream latents barely move: keep only the nonzero changes (row, |Δu|) and reduce
        # per row — the log of the entropy then runs on a few % of the entries.
        du = down_steered - down_clean
        where = du.nonzero()
        rows = where[:, 0]
        a = du[rows, where[:, 1]].abs()
        r = du.shape[0]

        def per_row(v: torch.Tensor) -> torch.Tensor:
            return torch.zeros(r, dtype=du.dtype).index_add_(0, rows, v)

        total = per_row(a)
        safe = total.clamp_min(1e-30)
        ent = torch.log(safe) + per_row(torch.special.entr(a)) / safe  # entr = −a log a
        stats["down_l2"] = per_row(a * a).sqrt()
        stats["moved"] = torch.where(total > 0, torch.exp(ent), 1.0)
        for tau in taus:
            stats[f"c{tau:g}"] = torch.bincount(rows[a > tau], minlength=r).to(dl.dtype)
    return dl, stats


def label_metrics(
    d_logits: torch.Tensor,
    stats: dict[str, torch.Tensor],
    nat: torch.Tensor,
    masks: dict[str, torch.Tensor],
    taus: Sequence[float],
    collateral_tau: float,
) -> dict[str, torch.Tensor]:
    """All labels ``{column: [B]}`` of B (feature, α) blocks of C contexts each.

    ``d_logits [B, C, V]``; ``stats[name] [B, C]`` from :func:`row_stats`; ``nat [B, C]`` (the
    feature's clean activation per context); ``masks[type] [B, C]``. Every label of every type
    is a masked mean over the C contexts: one Gram matrix of the effects serves the pairwise
    cosines of all types, and the mean effects of all types come from one batched product.
    """
    norms = stats["norm"]  # [B, C]
    types = list(ALL_TYPES)
    w = torch.stack([masks[t] for t in types], 1).to(d_logits.dtype)  # [B, T, C]
    n = w.sum(-1)  # [B, T]
    mean_eff = torch.bmm(w, d_logits) / n.clamp_min(1)[..., None]  # [B, T, V]
    m_norm = mean_eff.norm(dim=-1)  # [B, T]
    dots = torch.bmm(d_logits, mean_eff.transpose(1, 2))  # [B, C, T]: Δℓ_c · m_t
    cos_m = dots / (norms[..., None] * m_norm[:, None, :]).clamp_min(1e-30)
    gram = torch.bmm(d_logits, d_logits.transpose(1, 2))
    cos_pair = gram / (norms[:, :, None] * norms[:, None, :]).clamp_min(1e-30)
    ok = norms > EPS  # the reference drops effects of norm ≤ 1e-8 from cosines
    off_diag = 1 - torch.eye(norms.shape[1], dtype=d_logits.dtype)

    out: dict[str, torch.Tensor] = {}
    for ti, t in enumerate(types):
        wt, nt = w[:, ti], n[:, ti]
        sfx = "" if t == "mixed" else f"__{t}"

        def mean(v: torch.Tensor, wt: torch.Tensor = wt, nt: torch.Tensor = nt) -> torch.Tensor:
            return (v * wt).sum(1) / nt.clamp_min(1)

        e = mean(norms)
        var = ((norms - e[:, None]) ** 2 * wt).sum(1) / (nt - 1).clamp_min(1)
        out[f"effect_l2{sfx}"] = e
        out[f"effect_cv{sfx}"] = torch.where(nt > 1, var.sqrt(), torch.nan) / e.clamp_min(EPS)
        valid = (wt > 0) & ok & (m_norm[:, ti] > EPS)[:, None]
        nv = valid.sum(1).to(d_logits.dtype)
        c = cos_m[:, :, ti]
        out[f"stability_signed{sfx}"] = _safe_div((c * valid).sum(1), nv)
        out[f"stability_abs{sfx}"] = _safe_div((c.abs() * valid).sum(1), nv)
        pv = ((wt > 0) & ok).to(d_logits.dtype)
        pair = pv[:, :, None] * pv[:, None, :] * off_diag
        npairs = pair.sum((1, 2))
        out[f"pairwise_signed{sfx}"] = _safe_div((cos_pair * pair).sum((1, 2)), npairs)
        out[f"pairwise_abs{sfx}"] = _safe_div((cos_pair.abs() * pair).sum((1, 2)), npairs)
        out[f"kl{sfx}"] = mean(stats["kl"])
        out[f"kl_reverse{sfx}"] = mean(stats["kl_reverse"])
        out[f"kl_per_effect{sfx}"] = out[f"kl{sfx}"] / (e + EPS)
        if "down_l2" in stats:
            for tau in taus:
                out[f"collateral_count_{tau:g}{sfx}"] = mean(stats[f"c{tau:g}"])
            out[f"collateral_per_effect{sfx}"] = mean(stats[f"c{collateral_tau:g}"]) / (e + EPS)
            out[f"downstream_l2{sfx}"] = mean(stats["down_l2"])
            out[f"downstream_l2_per_effect{sfx}"] = out[f"downstream_l2{sfx}"] / (e + EPS)
            out[f"effective_moved{sfx}"] = mean(stats["moved"])
        out[f"ctx_act_mean{sfx}"] = mean(nat)
        out[f"ctx_act_max{sfx}"] = torch.where(wt > 0, nat, -torch.inf).max(1).values
        out[f"n_contexts{sfx}"] = nt
    return out


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1), torch.nan)


# --------------------------------------------------------------------------- computing labels
def _taus(options: LabelOptions) -> list[float]:
    taus = list(dict.fromkeys(float(t) for t in options.taus))
    if options.collateral_tau not in taus:
        taus.append(float(options.collateral_tau))
    return taus


BLOCK_ROWS = 3072
"""Triples per engine call at most (64 features × 48 contexts): large enough that the per-call
overhead vanishes. On CPU the ``[rows, vocab]`` metric tensors are further kept within
:data:`steerscope.engine.CPU_TENSOR_BYTES` (fresh allocations above glibc's 32 MB mmap threshold
pay their page faults on every block)."""


def block_size(setup: LabelSetup) -> int:
    """Features per engine call, from the memory budget and the CPU tensor-size cap."""
    width = max(setup.subject.vocab_size, setup.options.panel_size)
    item = torch.empty(0, dtype=setup.metric_dtype).element_size()
    per_row = width * item * 8  # ~8 live [rows, width] tensors while the labels are computed
    rows = max(1, min(BLOCK_ROWS, int(setup.options.memory_mb * 2**20 // per_row)))
    if setup.subject.device.type == "cpu":
        rows = min(rows, CPU_TENSOR_BYTES // (width * item))
    n_ctx = 3 * min(setup.options.per_type, setup.n)
    return max(1, rows // (n_ctx * len(setup.alphas)))


def _frame(features: Sequence[int], alphas: Sequence[float], cols: dict[str, torch.Tensor]):
    """Rows ordered feature-major, then α (the order of the B axis)."""
    data: dict[str, Any] = {
        "feature": np.repeat(np.asarray(features, dtype=np.int64), len(alphas)),
        "alpha": np.tile(np.asarray(alphas, dtype=np.float64), len(features)),
    }
    for k, v in cols.items():
        arr = v.double().numpy()
        data[k] = arr.astype(np.int64) if k.startswith("n_contexts") else arr
    return pd.DataFrame(data)


def labels_block(setup: LabelSetup, features: Sequence[int]) -> pd.DataFrame:
    """Labels of ``features`` with the batched engine: one replay of all their triples."""
    if setup.prefix is None:
        raise SteerscopeError("this setup has no cached prefix", "build it with prepare()")
    opts, sae = setup.options, setup.sae
    ctx, masks = context_rows(setup, features)  # [F, C]
    n_f, width = ctx.shape
    n_a = len(setup.alphas)
    feats = torch.as_tensor(list(features), dtype=torch.long)
    W = sae.W_dec.detach()
    dirs = W[feats.to(W.device)]
    if opts.unit:
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    alpha = torch.tensor(setup.alphas, dtype=dirs.dtype, device=dirs.device)
    # rows: feature-major, then α, then context
    delta = (alpha[None, :, None, None] * dirs[:, None, None, :]).expand(n_f, n_a, width, -1)
    rows_ctx = ctx[:, None, :].expand(n_f, n_a, width).reshape(-1)
    capture = (setup.downstream.hook,) if setup.downstream is not None else ()
    logits, acts = setup.prefix.replay(
        rows_ctx, sae.hook, delta.reshape(-1, dirs.shape[-1]), capture=capture
    )
    return _labels_from_outputs(setup, features, ctx, masks, logits, acts)


def _labels_from_outputs(
    setup: LabelSetup,
    features: Sequence[int],
    ctx: torch.Tensor,
    masks: dict[str, torch.Tensor],
    logits: torch.Tensor,
    acts: dict[str, torch.Tensor],
) -> pd.DataFrame:
    """Labels from steered final-position outputs of rows (feature, α, context)."""
    n_f, width = ctx.shape
    n_a = len(setup.alphas)
    b = n_f * n_a
    dt = setup.metric_dtype
    rows_ctx = ctx[:, None, :].expand(n_f, n_a, width).reshape(-1)
    down_s = down_c = None
    if setup.downstream is not None:
        assert setup.down_clean is not None
        down_s = _encode(setup.downstream, acts[setup.downstream.hook], dt)
        if setup.panel is not None:
            down_s = down_s.index_select(1, setup.panel)
        down_c = setup.down_clean.index_select(0, rows_ctx)
    dl, stats = row_stats(
        logits.to(device="cpu", dtype=dt), setup.clean_logits.index_select(0, rows_ctx),
        setup.clean_p.index_select(0, rows_ctx), down_s, down_c, _taus(setup.options),
    )
    feats = torch.as_tensor(list(features), dtype=torch.long)
    nat = setup.primary[ctx, feats[:, None]].to(dt)  # [F, C]
    nat = nat[:, None].expand(n_f, n_a, width).reshape(b, width)
    bm = {t: m[:, None].expand(n_f, n_a, width).reshape(b, width) for t, m in masks.items()}
    cols = label_metrics(
        dl.reshape(b, width, -1), {k: v.reshape(b, width) for k, v in stats.items()}, nat, bm,
        _taus(setup.options), setup.options.collateral_tau,
    )
    return _frame(features, setup.alphas, cols)


def compute_labels(
    setup: LabelSetup,
    features: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Labels of ``features`` (all by default), one row per (feature, α), in blocks."""
    feats = check_features(setup.sae, features)
    step = block_size(setup)
    parts = []
    for lo in range(0, len(feats), step):
        parts.append(labels_block(setup, feats[lo:lo + step]))
        if progress is not None:
            progress("labels", min(1.0, (lo + step) / len(feats)))
    return pd.concat(parts, ignore_index=True)


def naive_labels_block(setup: LabelSetup, feature: int, batch_size: int = 16) -> pd.DataFrame:
    """The reference way: one feature, full forwards of its contexts with the edit applied.

    Batches of ``batch_size`` contexts (the reference's ``BATCH_STEER = 16``), logits of every
    position, the same label formulas. Used by the benchmark and the equivalence tests.
    """
    opts, sae, subject = setup.options, setup.sae, setup.subject
    ctx, masks = context_rows(setup, [feature])
    d = sae.W_dec[feature].detach()
    if opts.unit:
        d = d / d.norm().clamp_min(1e-12)
    capture = (setup.downstream.hook,) if setup.downstream is not None else ()
    logit_parts: list[torch.Tensor] = []
    act_parts: dict[str, list[torch.Tensor]] = {s: [] for s in capture}
    for a in setup.alphas:
        vec = (a * d).to(device=subject.device, dtype=subject.dtype)

        def edit(x: torch.Tensor, vec: torch.Tensor = vec) -> torch.Tensor:
            out = x.clone()
            out[:, -1] = out[:, -1] + vec
            return out

        rows = ctx[0]
        for lo in range(0, len(rows), batch_size):
            logits, store, _ = subject.forward(
                setup.ids[rows[lo:lo + batch_size]], edits={sae.hook: edit}, capture=capture
            )
            assert logits is not None
            logit_parts.append(logits[:, -1])
            for s in capture:
                act_parts[s].append(store[s][:, -1])
    logits = torch.cat(logit_parts)
    acts = {s: torch.cat(v) for s, v in act_parts.items()}
    return _labels_from_outputs(setup, [feature], ctx, masks, logits, acts)


# --------------------------------------------------------------------------- the CLI job
def features_spec(spec: str | None, d_sae: int) -> list[int] | None:
    """``--features``: None (all), ``N`` (the first N), or a list ``1,5,9`` / ranges ``0-99``."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    text = spec.strip()
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if n < 1:
            raise SteerscopeError(f"--features {n} selects nothing", "use a positive count")
        if n > d_sae:
            raise SteerscopeError(
                f"--features {n} is more than the SAE's {d_sae} features",
                f"use at most {d_sae}, or a list of indices",
            )
        return list(range(n))
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        rng = re.fullmatch(r"(\d+)-(\d+)", part)
        if rng:
            out.extend(range(int(rng.group(1)), int(rng.group(2)) + 1))
        elif re.fullmatch(r"-?\d+", part):
            out.append(int(part))
        else:
            raise SteerscopeError(
                f"cannot read --features '{spec}'",
                "use a count (100), a list (1,5,9) or a range (0-99)",
            )
    return out


def parse_alphas(spec: str) -> tuple[float, ...] | str:
    """``--alpha``: ``auto`` or a comma-separated strength grid."""
    if spec.strip() == "auto":
        return "auto"
    parts = [p for p in spec.split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise SteerscopeError(
            f"cannot read --alpha '{spec}'", "use numbers like 1 or 0.5,1,2"
        ) from None
    return tuple(check_strengths(vals, "strength"))


def run_labels(
    out: str | Path,
    *,
    model: str | None = None,
    sae: str = "relu-blocks.0.hook_resid_post",
    downstream_sae: str | None = "relu-blocks.1.hook_resid_post",
    corpus: str = "tinystories-train.txt",
    n_contexts: int = 2048,
    context_length: int = 48,
    features: str | Sequence[int] | None = None,
    options: LabelOptions = LabelOptions(),
    shard_size: int = 256,
    device: str = "cpu",
    dtype: str = "float32",
    progress: Progress | None = None,
) -> Path:
    """Label features into ``out/labels.parquet`` (+ ``manifest.json``), resumably.

    Features are computed in shards of ``shard_size`` under ``out/shards-labels/``; a rerun with
    the same job reuses finished shards and writes the identical table. Everything is checked
    before any compute; the table and manifest are written atomically at the end.
    """
    from steerscope import assets, store
    from steerscope.corpus import load_contexts
    from steerscope.saes import load_sae

    check_options(options)
    if n_contexts < 1:
        raise SteerscopeError(f"--contexts {n_contexts} < 1", "use e.g. 2048")
    if context_length < 2:
        raise SteerscopeError(
            f"context length {context_length} is too short to steer the last position",
            "use --context-length 2 or more",
        )
    if shard_size < 1:
        raise SteerscopeError(f"shard size {shard_size} < 1", "use e.g. 256")
    if downstream_sae is not None and downstream_sae.strip().lower() in ("", "none"):
        downstream_sae = None  # logit-side labels only
    report = progress or (lambda _w, _f: None)
    report("loading", 0.0)
    model_path = assets.resolve_model(model)
    subject = Subject.load(model_path, device=device, dtype=dtype)
    primary = load_sae(*assets.resolve_sae(sae), device=device)
    down = load_sae(*assets.resolve_sae(downstream_sae), device=device) if downstream_sae else None
    check_sites(subject, primary, down)
    if isinstance(features, str) or features is None:
        feats = check_features(primary, features_spec(features, primary.d_sae))
    else:
        feats = check_features(primary, features)
    cpath = assets.corpus_path(corpus)
    contexts = load_contexts(subject.tokenizer, cpath, context_length, max_contexts=n_contexts)
    check_contexts(contexts.ids, subject)

    key = {
        "model": model_path, "sae": sae, "downstream_sae": downstream_sae,
        "sae_sha256": _dir_digest(primary), "downstream_sha256": _dir_digest(down),
        "corpus_sha256": contexts.digest, "n_contexts": len(contexts),
        "context_length": context_length, "options": asdict(options) | {"memory_mb": None},
        "features_sha256": hashlib.sha256(np.asarray(feats, np.int64).tobytes()).hexdigest(),
        "shard_size": shard_size, "dtype": dtype,
    }
    out = Path(out)
    shards = store.Shards(out / "shards-labels", key)
    n_shards = math.ceil(len(feats) / shard_size)
    state: dict[str, LabelSetup] = {}

    def compute(i: int) -> pd.DataFrame:
        if "setup" not in state:
            report("clean pass", 0.0)
            state["setup"] = prepare(subject, primary, down, contexts.ids, options)
        part = feats[i * shard_size:(i + 1) * shard_size]
        return compute_labels(state["setup"], part)

    table = shards.run(n_shards, compute, lambda i, n: report("labels", i / n))
    alphas = state["setup"].alphas if "setup" in state else sorted(set(table["alpha"]))
    meta = store.manifest(
        model=model_path, sae=[sae, downstream_sae] if downstream_sae else sae,
        corpus=str(cpath), corpus_sha256=contexts.digest, seed=options.seed,
        stage="labels", protocol="duan-2026 fixed_global_add (methods.md §2.2-2.4)",
        n_contexts=len(contexts), context_length=context_length, n_features=len(feats),
        alphas=alphas, options=asdict(options), hook=primary.hook,
        downstream_hook=down.hook if down is not None else None, device=device, dtype=dtype,
        engine_fast_path=(state["setup"].prefix.fast if "setup" in state and
                          state["setup"].prefix is not None else None),
    )
    path = store.write_parquet(table, out / "labels.parquet")
    store.write_json(meta, out / "manifest.json")
    return path


def _dir_digest(sae: SAE | None) -> str | None:
    """A digest of the SAE's weights: a retrained SAE under the same name must not reuse shards."""
    if sae is None:
        return None
    h = hashlib.sha256()
    for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
