"""Steering operators: what is added to the residual stream, how strong, and where.

Strength means different things in different tools (docs/ecosystem.md §5, methods.md §1–2), and
the difference matters as soon as decoder rows are not unit-norm (our own SAEs, SAELens's
standard SAEs trained without a norm constraint):

========================  ===========================================  ==========================
``scale``                 vector added at a steered position           decoder normalisation
========================  ===========================================  ==========================
``"absolute"``            ``α · d``                                    raw row (Neuronpedia,
                                                                       SAELens tutorial, Duan:
                                                                       α is in units of the
                                                                       feature's own activation);
                                                                       ``unit=True``: α is a
                                                                       residual-stream length
``"feature_max"``         ``α · max_act_f · d``                        AxBench / Neuronpedia
                                                                       "× max activation":
                                                                       assumes the raw row, so
                                                                       ``α = 1`` re-creates the
                                                                       feature's strongest
                                                                       natural firing
``"position_max"``        ``α · max_j a_j(x) · d``                     Arad et al.: relative to
                                                                       the largest latent at that
                                                                       position; their SAEs
                                                                       (Gemma Scope) have unit
                                                                       rows, so raw = unit there
========================  ===========================================  ==========================

``d`` is ``W_dec[f]`` (raw) or ``W_dec[f] / ‖W_dec[f]‖`` (``unit=True``). :class:`ClampLatent`
sets a latent to a value in SAE space and keeps the SAE's reconstruction error, so the rest of
the activation is untouched: ``x' = x + decode(a') − decode(a)`` (``= x + (c − a_f) W_dec[f]``
for a linear decoder); it always works in the raw decoder basis, because that is what the
latent value means.

Position policies: ``"last"``, ``"all"``, or an integer ``p`` — every position ``≥ p`` of the
tensor the hook sees. (Under KV-cached generation the hook sees one new token per step, so
``"all"`` and ``p ≤ 0`` steer every generated token; see :mod:`steerscope.generation`.)

Per-triple variants for the batched engine (:mod:`steerscope.engine`, one feature and strength
per row) are :func:`additive_deltas` (a ``[m, d]`` delta) and :func:`position_max_edit` /
:func:`clamp_edit` (row edits that need the activation itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from steerscope.errors import SteerscopeError
from steerscope.saes import SAE
from steerscope.subject import Edit

Positions = Literal["all", "last"] | int
Scale = Literal["absolute", "feature_max", "position_max"]
SCALES = ("absolute", "feature_max", "position_max")

RowEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- validation
def check_feature(sae: SAE, feature: int) -> int:
    """``feature`` as an int, or a one-line error naming the valid range."""
    if isinstance(feature, bool) or not 0 <= int(feature) < sae.d_sae:
        raise SteerscopeError(
            f"feature {feature} is out of range for SAE '{sae.name}' (d_sae={sae.d_sae})",
            f"use a feature index from 0 to {sae.d_sae - 1}",
        )
    return int(feature)


def check_strengths(strengths: Sequence[float] | float, what: str = "strength") -> list[float]:
    """A non-empty list of finite numbers (a strength grid), or a one-line error."""
    vals = [strengths] if isinstance(strengths, (int, float)) else list(strengths)
    if not vals:
        raise SteerscopeError(f"the {what} grid is empty", f"give at least one {what}")
    out = []
    for v in vals:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise SteerscopeError(f"{what} {v!r} is not a number", "use finite numbers") from None
        if not math.isfinite(f):
            raise SteerscopeError(f"{what} {v} is not finite", "use finite numbers")
        out.append(f)
    return out


def _check_positions(positions: Positions) -> Positions:
    if isinstance(positions, bool):
        raise SteerscopeError(f"unknown position policy '{positions}'", "use all, last or an int")
    if isinstance(positions, int) or positions in ("all", "last"):
        return positions
    if isinstance(positions, str) and positions.lstrip("-").isdigit():
        return int(positions)
    raise SteerscopeError(
        f"unknown position policy '{positions}'", "use all, last, or an integer start position p"
    )


def _check_scale(scale: str, max_activation: float | None) -> None:
    if scale not in SCALES:
        raise SteerscopeError(f"unknown strength scale '{scale}'", f"use {' | '.join(SCALES)}")
    if scale == "feature_max" and (max_activation is None or not math.isfinite(max_activation)):
        raise SteerscopeError(
            "scale 'feature_max' needs the feature's max activation",
            "pass max_activation (e.g. from the predictors table's act_max)",
        )


def direction(sae: SAE, feature: int, unit: bool = False) -> torch.Tensor:
    """The decoder row of ``feature``: raw, or unit-normalised."""
    d = sae.W_dec[check_feature(sae, feature)].detach()
    return d / d.norm().clamp_min(1e-12) if unit else d


def _position_mask(x: torch.Tensor, positions: Positions) -> torch.Tensor:
    """``[pos, 1]`` mask of the positions of ``x [batch, pos, d]`` a policy steers."""
    n = x.shape[1]
    mask = torch.zeros(n, 1, dtype=torch.bool, device=x.device)
    if positions == "all":
        mask[:] = True
    elif positions == "last":
        mask[-1] = True
    else:
        start = int(positions)
        start = start + n if start < 0 else start
        mask[max(0, start):] = True
    return mask


# --------------------------------------------------------------------------- operators
@dataclass(frozen=True)
class AdditiveSteer:
    """Add ``strength · scale · d`` at the chosen positions (see the module table).

    ``unit=False`` is the Neuronpedia / SAELens-tutorial / Duan convention (raw ``W_dec[f]``:
    strength is in units of the feature's own activation scale); ``unit=True`` makes strength an
    absolute residual-stream length, comparable across SAEs with different decoder norms.
    """

    feature: int
    strength: float
    unit: bool = False
    positions: Positions = "all"
    scale: Scale = "absolute"
    max_activation: float | None = None

    @property
    def depends_on_input(self) -> bool:
        """Whether the added vector depends on the activation (only Arad's position_max)."""
        return self.scale == "position_max"

    @classmethod
    def batch_edit(cls, ops: Sequence[AdditiveSteer], sae: SAE) -> RowEdit:
        """One row edit for many operators: row ``i`` of a call applies ``ops[rows[i]]``."""
        feats = [op.feature for op in ops]
        if not any(op.depends_on_input for op in ops):
            table = torch.stack([op.vector(sae) for op in ops])

            def add(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                return x + table.to(device=x.device, dtype=x.dtype)[rows.to(x.device)]

            return add
        units = {op.unit for op in ops}
        if all(op.depends_on_input for op in ops) and len(units) == 1:
            return position_max_edit(sae, feats, [op.strength for op in ops], unit=units.pop())
        edits = [op.edit(sae) for op in ops]

        def mixed(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return torch.stack(
                [edits[r](x[j][None, None])[0, 0] for j, r in enumerate(rows.tolist())]
            )

        return mixed

    def vector(self, sae: SAE) -> torch.Tensor:
        """The added vector for the position-independent scales (absolute, feature_max)."""
        check_strengths([self.strength])
        _check_scale(self.scale, self.max_activation)
        if self.scale == "position_max":
            raise SteerscopeError(
                "scale 'position_max' depends on the activation", "use edit() instead of vector()"
            )
        coeff = self.strength * (self.max_activation if self.scale == "feature_max" else 1.0)
        return coeff * direction(sae, self.feature, self.unit)

    def edit(self, sae: SAE) -> Edit:
        """The edit function for :meth:`steerscope.subject.Subject.forward`."""
        positions = _check_positions(self.positions)
        check_strengths([self.strength])
        _check_scale(self.scale, self.max_activation)
        d = direction(sae, self.feature, self.unit)
        fixed = None if self.scale == "position_max" else self.vector(sae)
        strength = self.strength

        def apply(x: torch.Tensor) -> torch.Tensor:
            mask = _position_mask(x, positions).to(x.dtype)
            if fixed is not None:
                return x + mask * fixed.to(device=x.device, dtype=x.dtype)
            a_max = sae.encode(x).max(dim=-1, keepdim=True).values  # [batch, pos, 1]
            add = strength * a_max.to(x.dtype) * d.to(device=x.device, dtype=x.dtype)
            return x + mask * add

        return apply


@dataclass(frozen=True)
class ClampLatent:
    """Set latent ``feature`` to ``value`` at the chosen positions, keeping the SAE error.

    ``x' = x − decode(a) + decode(a')`` where ``a'`` is ``a`` with ``a_f = value``: everything
    the SAE does not explain stays in the residual (Arad's hook keeps the error the same way).
    Duan's ``feature_q95`` mode is this clamp with ``value = q95_f``.
    """

    feature: int
    value: float
    positions: Positions = "all"

    depends_on_input = True  # the added vector is (value − a_f(x)) · W_dec[f]

    @classmethod
    def batch_edit(cls, ops: Sequence[ClampLatent], sae: SAE) -> RowEdit:
        """One row edit for many clamps: row ``i`` of a call applies ``ops[rows[i]]``."""
        return clamp_edit(sae, [op.feature for op in ops], [op.value for op in ops])

    def edit(self, sae: SAE) -> Edit:
        positions = _check_positions(self.positions)
        f = check_feature(sae, self.feature)
        (value,) = check_strengths([self.value], "clamp value")

        def apply(x: torch.Tensor) -> torch.Tensor:
            mask = _position_mask(x, positions).to(x.dtype)
            return x + mask * _clamp_delta(sae, x, torch.full(x.shape[:-1], f), value)

        return apply


def _clamp_delta(
    sae: SAE, x: torch.Tensor, features: torch.Tensor, values: torch.Tensor | float
) -> torch.Tensor:
    """``decode(a') − decode(a)`` with ``a'[..., features] = values`` (shapes of ``x[..., 0]``)."""
    a = sae.encode(x)
    new = a.clone()
    idx = features.to(a.device).long().unsqueeze(-1)
    val = torch.as_tensor(values, dtype=a.dtype, device=a.device).expand(idx.shape[:-1])
    new.scatter_(-1, idx, val.unsqueeze(-1))
    return (sae.decode(new) - sae.decode(a)).to(x.dtype)


# --------------------------------------------------------------------------- engine rows
def additive_deltas(
    sae: SAE,
    features: torch.Tensor | Sequence[int],
    strengths: torch.Tensor | Sequence[float] | float,
    *,
    unit: bool = False,
    scale: Scale = "absolute",
    max_activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[m, d]`` steering vectors, one per (feature, strength) row, for ``CleanPrefix.replay``.

    ``scale="feature_max"`` needs ``max_activation`` indexed by feature (``[d_sae]``).
    """
    feats = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    if feats.numel() and (int(feats.min()) < 0 or int(feats.max()) >= sae.d_sae):
        bad = int(feats.max()) if int(feats.max()) >= sae.d_sae else int(feats.min())
        check_feature(sae, bad)
    s = torch.as_tensor(strengths, dtype=torch.float64).reshape(-1)
    if s.numel() == 1:
        s = s.expand(feats.numel())
    check_strengths(s.tolist() or [0.0])
    if s.numel() != feats.numel():
        raise SteerscopeError(
            f"{s.numel()} strengths for {feats.numel()} features", "give one strength per row"
        )
    if scale == "position_max":
        raise SteerscopeError("scale 'position_max' depends on the activation",
                              "use position_max_edit() as the engine's row_edit")
    if scale not in SCALES:
        raise SteerscopeError(f"unknown strength scale '{scale}'", f"use {' | '.join(SCALES)}")
    if scale == "feature_max" and max_activation is None:
        raise SteerscopeError("scale 'feature_max' needs the features' max activations",
                              "pass max_activation, a [d_sae] tensor")
    W = sae.W_dec.detach()
    rows = W[feats.to(W.device)]
    if unit:
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    coeff = s.to(W.dtype).to(W.device)
    if scale == "feature_max":
        assert max_activation is not None
        coeff = coeff * torch.as_tensor(max_activation, dtype=W.dtype, device=W.device)[feats]
    return coeff[:, None] * rows


def position_max_edit(
    sae: SAE,
    features: torch.Tensor | Sequence[int],
    strengths: torch.Tensor | Sequence[float] | float,
    *,
    unit: bool = False,
) -> RowEdit:
    """Arad's convention as a row edit: row i adds ``s_i · max_j a_j(x_last) · d_{f_i}``."""
    deltas = additive_deltas(sae, features, strengths, unit=unit)  # s_i · d_{f_i}

    def apply(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        a_max = sae.encode(x).max(dim=-1, keepdim=True).values.to(x.dtype)
        return x + a_max * deltas[rows.to(deltas.device)].to(device=x.device, dtype=x.dtype)

    return apply


def clamp_edit(
    sae: SAE, features: torch.Tensor | Sequence[int], values: torch.Tensor | Sequence[float] | float
) -> RowEdit:
    """Row i clamps latent ``f_i`` to ``v_i`` at the last position, keeping the SAE error."""
    feats = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    for f in feats.unique().tolist():
        check_feature(sae, f)
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    v = v.expand(feats.numel()) if v.numel() == 1 else v
    check_strengths(v.tolist() or [0.0], "clamp value")

    def apply(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return x + _clamp_delta(sae, x, feats[rows], v[rows].to(x.dtype))

    return apply
