"""What a report shows, as plain data: the library fills these, the renderer only formats them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd


@dataclass
class Snippet:
    """A top-activating corpus context: text around the token where the feature fires."""

    before: str
    token: str
    after: str
    activation: float


@dataclass
class Steered:
    """One prompt continued without and with the feature added (same sampling)."""

    prompt: str
    clean: str
    steered: str
    strength: float
    how: str = ""  # e.g. "+4 × max activation · W_dec[f], all positions"


@dataclass
class FeatureCard:
    """One ranked feature: prediction with interval, measured labels, what it reads and writes."""

    feature: int
    rank: int
    tier: str
    pred: float
    lo: float
    hi: float
    predicted: dict[str, float | None] = field(default_factory=dict)
    measured: dict[str, float | None] = field(default_factory=dict)
    logit_lens: list[str] = field(default_factory=list)
    snippets: list[Snippet] = field(default_factory=list)
    steered: Steered | None = None


@dataclass
class ReportData:
    """Everything :func:`steerscope.report.render_report` needs.

    ``evaluation`` is the content of ``evaluation.json`` (``headline``, ``univariate``, ``cv``,
    ``verdicts``, ``heldout``, ``screen``); ``labelled`` the labelled features' predictors and
    labels (for the scatter); ``screen`` the ranked table of ``screen.parquet``.
    """

    title: str
    run: dict[str, Any]
    evaluation: dict[str, Any]
    labelled: pd.DataFrame | None = None
    screen: pd.DataFrame | None = None
    cards: list[FeatureCard] = field(default_factory=list)
