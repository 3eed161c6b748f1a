"""One feature, one prompt: the clean and the steered continuation side by side."""

from __future__ import annotations

from steerscope.assets import resolve_model, resolve_sae
from steerscope.generation import Sampling, generate
from steerscope.interventions import AdditiveSteer
from steerscope.saes import load_sae
from steerscope.subject import Subject


def steer_side_by_side(
    *,
    prompt: str,
    feature: int,
    strength: float,
    sae: str,
    model: str | None = None,
    hook: str | None = None,
    unit: bool = False,
    positions: str = "all",
    sampling: Sampling | None = None,
) -> tuple[str, str]:
    """``(clean, steered)`` continuations with the same sampling seed."""
    subject = Subject.load(resolve_model(model))
    source, sae_id = resolve_sae(sae)
    lens = load_sae(source, sae_id, hook=hook)
    lens.check(subject)
    op = AdditiveSteer(feature, strength, unit=unit, positions=positions)  # type: ignore[arg-type]
    op.edit(lens)  # validates feature, strength and positions before any generation
    sampling = sampling or Sampling()
    clean = generate(subject, [prompt], sampling)[0]
    steered = generate(subject, [prompt], sampling, op=op, sae=lens, site=hook or lens.hook)[0]
    return clean, steered
