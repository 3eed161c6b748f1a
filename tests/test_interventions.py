"""Steering operators: closed forms of each strength convention, clamps, position policies."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_sae

from steerscope.engine import CleanPrefix
from steerscope.errors import SteerscopeError
from steerscope.interventions import (
    AdditiveSteer,
    ClampLatent,
    additive_deltas,
    clamp_edit,
    position_max_edit,
)

D, W = 16, 24


@pytest.fixture(scope="module")
def sae():  # noqa: ANN201
    s = tiny_sae(D, W)
    with torch.no_grad():
        s.module.W_dec.mul_(torch.linspace(0.5, 3.0, W)[:, None])  # rows of different norms
    return s


def _x(seed: int = 0, shape: tuple[int, ...] = (3, 5, D)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_absolute_raw_and_unit(sae) -> None:  # noqa: ANN001
    d = sae.W_dec[7].detach()
    torch.testing.assert_close(AdditiveSteer(7, 2.5).vector(sae), 2.5 * d)
    unit = AdditiveSteer(7, 2.5, unit=True).vector(sae)
    torch.testing.assert_close(unit.norm(), torch.tensor(2.5))
    torch.testing.assert_close(unit / unit.norm(), d / d.norm())


def test_feature_max_scales_by_the_max_activation(sae) -> None:  # noqa: ANN001
    op = AdditiveSteer(3, 0.5, scale="feature_max", max_activation=4.0)
    torch.testing.assert_close(op.vector(sae), 2.0 * sae.W_dec[3].detach())
    with pytest.raises(SteerscopeError, match="max activation"):
        AdditiveSteer(3, 0.5, scale="feature_max").vector(sae)


def test_position_max_is_arads_latent_space_amplification(sae) -> None:  # noqa: ANN001
    """x + s·a_max·W_dec[f] equals decode(a with a_f += s·a_max) + SAE error (linear decoder)."""
    x = _x()
    s, f = 0.7, 11
    out = AdditiveSteer(f, s, scale="position_max", positions="all").edit(sae)(x)
    a = sae.encode(x)
    a_max = a.max(-1, keepdim=True).values
    amplified = a.clone()
    amplified[..., f] += s * a_max[..., 0]
    expected = sae.decode(amplified) + (x - sae.decode(a))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert AdditiveSteer(f, s, scale="position_max").depends_on_input


def test_clamp_keeps_the_sae_error_and_sets_the_latent(sae) -> None:  # noqa: ANN001
    x = _x(1)
    f, c = 5, 3.0
    out = ClampLatent(f, c).edit(sae)(x)
    a = sae.encode(x)
    # closed form of a linear decoder: the change is (c − a_f)·W_dec[f]
    torch.testing.assert_close(out - x, (c - a[..., f:f + 1]) * sae.W_dec[f].detach(),
                               atol=1e-5, rtol=0)
    clamped = a.clone()
    clamped[..., f] = c
    torch.testing.assert_close(out - sae.decode(clamped), x - sae.decode(a), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("positions", "steered"), [
    ("last", [4]), ("all", [0, 1, 2, 3, 4]), (2, [2, 3, 4]), (-2, [3, 4]), (0, [0, 1, 2, 3, 4]),
])
def test_position_policies(sae, positions, steered) -> None:  # noqa: ANN001
    x = _x(2)
    for op in (AdditiveSteer(2, 1.5, positions=positions), ClampLatent(2, 2.0, positions),
               AdditiveSteer(2, 1.5, positions=positions, scale="position_max")):
        out = op.edit(sae)(x)
        changed = (out - x).abs().amax(dim=(0, 2)) > 0
        assert changed.nonzero().flatten().tolist() == steered, (op, positions)


def test_row_versions_equal_the_single_operators(sae) -> None:  # noqa: ANN001
    feats = [3, 0, 23, 3]
    strengths = [1.0, -2.0, 0.5, 4.0]
    deltas = additive_deltas(sae, feats, strengths, unit=True)
    for i, (f, s) in enumerate(zip(feats, strengths, strict=True)):
        torch.testing.assert_close(deltas[i], AdditiveSteer(f, s, unit=True).vector(sae))
    x = _x(3, (4, D))
    rows = torch.tensor([2, 0, 3, 1])
    pm = position_max_edit(sae, feats, strengths)(x, rows)
    cl = clamp_edit(sae, feats, [1.0, 2.0, 0.0, 5.0])(x, rows)
    for j, r in enumerate(rows.tolist()):
        one = AdditiveSteer(feats[r], strengths[r], scale="position_max", positions="last")
        torch.testing.assert_close(pm[j], one.edit(sae)(x[j][None, None])[0, 0])
        clamp = ClampLatent(feats[r], [1.0, 2.0, 0.0, 5.0][r], positions="last")
        torch.testing.assert_close(cl[j], clamp.edit(sae)(x[j][None, None])[0, 0])
    ops = [AdditiveSteer(f, s) for f, s in zip(feats, strengths, strict=True)]
    batch = AdditiveSteer.batch_edit(ops, sae)(x, rows)
    torch.testing.assert_close(batch, x + torch.stack([ops[r].vector(sae) for r in rows.tolist()]))


def test_engine_row_edit_equals_full_forward_with_the_operator() -> None:
    """Arad's strength through the engine's row edit = the operator in a full forward."""
    subject = tiny_llama()
    sae = tiny_sae(32, 48, hook="blocks.0.hook_resid_post")
    ids = torch.randint(3, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    pre = CleanPrefix.build(subject, ids)
    feats, strengths = [5, 17, 5], [2.0, -1.0, 0.5]
    ctx = torch.tensor([0, 3, 1])
    got, _ = pre.replay(ctx, sae.hook, row_edit=position_max_edit(sae, feats, strengths))
    for i, c in enumerate(ctx.tolist()):
        op = AdditiveSteer(feats[i], strengths[i], scale="position_max", positions="last")
        ref, _, _ = subject.forward(ids[c:c + 1], edits={sae.hook: op.edit(sae)})
        torch.testing.assert_close(got[i], ref[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [
    lambda s: AdditiveSteer(24, 1.0).vector(s),
    lambda s: AdditiveSteer(-1, 1.0).vector(s),
    lambda s: AdditiveSteer(1, float("nan")).vector(s),
    lambda s: AdditiveSteer(1, float("inf")).edit(s),
    lambda s: AdditiveSteer(1, 1.0, positions="middle").edit(s),
    lambda s: AdditiveSteer(1, 1.0, scale="bogus").edit(s),
    lambda s: AdditiveSteer(1, 1.0, scale="position_max").vector(s),
    lambda s: ClampLatent(99, 1.0).edit(s),
    lambda s: ClampLatent(1, float("nan")).edit(s),
    lambda s: additive_deltas(s, [1, 2], [1.0, 2.0, 3.0]),
    lambda s: additive_deltas(s, [1, 30], 1.0),
    lambda s: clamp_edit(s, [1], [float("inf")]),
])
def test_bad_input_raises(sae, make) -> None:  # noqa: ANN001
    with pytest.raises(SteerscopeError):
        make(sae)
