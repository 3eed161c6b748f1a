"""Labels: formulas against a plain per-context implementation of methods.md §2.4, the engine
against the one-feature-at-a-time reference loop, context choice, resume, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama, tiny_sae
from typer.testing import CliRunner

import steerscope.labels as labels_mod
from steerscope.errors import SteerscopeError
from steerscope.labels import (
    LabelOptions,
    compute_labels,
    context_rows,
    label_metrics,
    naive_labels_block,
    parse_alphas,
    prepare,
    row_stats,
    run_labels,
    select_contexts,
)

TAUS = (0.01, 0.05, 0.1)


# ------------------------------------------------------------------- formulas (methods.md §2.4)
def _plain_labels(dl, clean, steered, du, rows) -> dict[str, float]:  # noqa: ANN001
    """Labels of one context set, written directly from the formulas, context by context."""
    dl, clean, steered, du = dl[rows], clean[rows], steered[rows], du[rows]
    n = len(rows)
    norms = torch.stack([d.norm() for d in dl])
    m = dl.mean(0)
    ok = [i for i in range(n) if norms[i] > 1e-8] if m.norm() > 1e-8 else []
    cos_m = [F.cosine_similarity(dl[i], m, dim=0) for i in ok]
    okp = [i for i in range(n) if norms[i] > 1e-8]
    pairs = [F.cosine_similarity(dl[i], dl[j], dim=0) for i in okp for j in okp if i != j]
    kl = [(F.softmax(c, -1) * (F.log_softmax(c, -1) - F.log_softmax(s, -1))).sum()
          for c, s in zip(clean, steered, strict=True)]
    klr = [(F.softmax(s, -1) * (F.log_softmax(s, -1) - F.log_softmax(c, -1))).sum()
           for c, s in zip(clean, steered, strict=True)]
    e = float(norms.mean())
    out = {
        "effect_l2": e,
        "effect_cv": float(norms.std() / norms.mean()),
        "stability_signed": float(torch.stack(cos_m).mean()) if cos_m else math.nan,
        "stability_abs": float(torch.stack(cos_m).abs().mean()) if cos_m else math.nan,
        "pairwise_signed": float(torch.stack(pairs).mean()) if pairs else math.nan,
        "pairwise_abs": float(torch.stack(pairs).abs().mean()) if pairs else math.nan,
        "kl": float(torch.stack(kl).mean()),
        "kl_reverse": float(torch.stack(klr).mean()),
        "downstream_l2": float(torch.stack([u.norm() for u in du]).mean()),
    }
    moved = []
    for u in du:
        q = u.abs() / u.abs().sum() if u.abs().sum() > 0 else torch.zeros_like(u)
        h = -sum(float(p) * math.log(float(p)) for p in q if p > 0)
        moved.append(math.exp(h))
    out["effective_moved"] = float(np.mean(moved))
    for tau in TAUS:
        out[f"collateral_count_{tau:g}"] = float(np.mean([int((u.abs() > tau).sum()) for u in du]))
    out["collateral_per_effect"] = out["collateral_count_0.05"] / (e + 1e-8)
    out["kl_per_effect"] = out["kl"] / (e + 1e-8)
    return out


def test_metrics_equal_the_plain_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    b, c, v, k = 3, 12, 40, 30
    clean = torch.randn(b, c, v, generator=gen) * 3
    dl = torch.randn(b, c, v, generator=gen) + torch.randn(b, 1, v, generator=gen)
    dl[1, 4] = 0.0  # a context where steering changed nothing: skipped by the cosines
    du = torch.randn(b, c, k, generator=gen) * (torch.rand(b, c, k, generator=gen) < 0.3) * 0.1
    du[2, 0] = 0.0
    steered = clean + dl
    masks = {t: torch.zeros(b, c, dtype=torch.bool) for t in ("mixed", "top", "random", "low")}
    masks["top"][:, :4] = True
    masks["random"][:, 4:8] = True
    masks["low"][:, 8:] = True
    masks["mixed"][:] = True
    masks["mixed"][:, 9] = False  # a duplicate context: in "low" but not again in "mixed"
    steered[0, 1, 3] += 200.0  # overflowing exponentials: the direct KL formula takes over
    dl[0, 1, 3] += 200.0
    dl_rows, stats = row_stats(
        steered.reshape(-1, v), clean.reshape(-1, v), torch.softmax(clean, -1).reshape(-1, v),
        du.reshape(-1, k), torch.zeros(b * c, k), TAUS,
    )
    got = label_metrics(dl_rows.reshape(b, c, v), {n: s.reshape(b, c) for n, s in stats.items()},
                        torch.zeros(b, c), masks, TAUS, 0.05)
    for t, mask in masks.items():
        sfx = "" if t == "mixed" else f"__{t}"
        for i in range(b):
            rows = mask[i].nonzero().flatten()
            want = _plain_labels(dl[i], clean[i], steered[i], du[i], rows)
            for name, value in want.items():
                close = pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True)
                assert got[name + sfx][i].item() == close, (name, t, i)
            assert got["n_contexts" + sfx][i].item() == len(rows)


# ------------------------------------------------------------------- contexts
def test_context_choice() -> None:
    gen = torch.Generator().manual_seed(1)
    acts = torch.rand(200, generator=gen) * (torch.rand(200, generator=gen) < 0.1)  # sparse
    pick = select_contexts(acts, 7, 16, seed=0)
    top, low, rnd = (set(pick[t].tolist()) for t in ("top", "low", "random"))
    assert len(top) == len(low) == len(rnd) == 16 and not (top & low) and not (rnd & (top | low))
    assert min(acts[list(top)]) >= max(acts[list(set(range(200)) - top)])
    assert max(acts[list(low)]) <= min(acts[list(set(range(200)) - low)])
    # a pure function of (seed, feature); ties among the zeros broken per feature
    again = select_contexts(acts, 7, 16, seed=0)
    assert all(np.array_equal(pick[t], again[t]) for t in pick)
    other = select_contexts(acts, 8, 16, seed=0)
    assert set(other["low"].tolist()) != low
    # overlapping types when there are few contexts: mixed is their union, once each
    setup = type("S", (), {})()
    setup.options = LabelOptions(per_type=4)
    setup.primary = acts[:6, None].repeat(1, 3)
    ctx, masks = context_rows(setup, [0, 2])
    for i in range(2):
        assert masks["mixed"][i].sum() == len(set(ctx[i][masks["top"][i] | masks["low"][i]
                                                      | masks["random"][i]].tolist())) == 6


# ------------------------------------------------------------------- engine vs reference loop
@pytest.fixture(scope="module")
def tiny_setup():  # noqa: ANN201
    subject = tiny_llama(d_model=32, n_layers=3)
    subject.model.double()
    sae = tiny_sae(32, 48, hook="blocks.0.hook_resid_post")
    down = tiny_sae(32, 40, hook="blocks.2.hook_resid_pre", seed=1)
    for s in (sae, down):
        s.module.double()
    ids = torch.randint(3, 64, (60, 10), generator=torch.Generator().manual_seed(0))
    return subject, sae, down, ids


def test_engine_labels_equal_the_reference_loop(tiny_setup) -> None:  # noqa: ANN001
    """Same features, both arms with their own clean pass: every label column within 1e-4."""
    subject, sae, down, ids = tiny_setup
    opts = LabelOptions(alphas=(1.0, 4.0), per_type=5, panel_size=32)
    feats = [0, 9, 47, 9, 3]
    ours = compute_labels(prepare(subject, sae, down, ids, opts), feats)
    ref_setup = prepare(subject, sae, down, ids, opts, build_prefix=False)
    theirs = pd.concat([naive_labels_block(ref_setup, f, batch_size=4) for f in [0, 9, 47, 3]],
                       ignore_index=True)
    assert list(ours["feature"]) == [0, 0, 9, 9, 47, 47, 3, 3]
    assert list(ours["alpha"]) == [1.0, 4.0] * 4
    pd.testing.assert_frame_equal(ours, theirs, atol=1e-4, rtol=0)
    assert (ours["effect_l2"] > 0).all() and (ours["n_contexts"] == 15).all()
    assert ours.filter(like="collateral_count").to_numpy().max() > 0


def test_closed_forms(tiny_setup) -> None:  # noqa: ANN001
    """A zero decoder row moves nothing; effect size is linear in α for small α."""
    subject, sae, down, ids = tiny_setup
    with torch.no_grad():
        saved = sae.module.W_dec[5].clone()
        sae.module.W_dec[5] = 0.0
    try:
        setup = prepare(subject, sae, down, ids, LabelOptions(alphas=(1.0,), per_type=5))
        row = compute_labels(setup, [5]).iloc[0]
    finally:
        with torch.no_grad():
            sae.module.W_dec[5] = saved
    assert row["effect_l2"] == 0 and row["kl"] == 0 and row["downstream_l2"] == 0
    assert row["collateral_count_0.01"] == 0 and row["effective_moved"] == 1
    assert math.isnan(row["stability_abs"]) and math.isnan(row["pairwise_abs"])
    small = compute_labels(prepare(subject, sae, down, ids,
                                   LabelOptions(alphas=(1e-3, 2e-3), per_type=5)), [7])
    ratio = small["effect_l2"].iloc[1] / small["effect_l2"].iloc[0]
    assert ratio == pytest.approx(2.0, rel=1e-3)
    # KL is second order in α: KL(2α) / KL(α) ≈ 4
    assert small["kl"].iloc[1] / small["kl"].iloc[0] == pytest.approx(4.0, rel=1e-2)


def test_auto_alpha_is_the_median_rule(tiny_setup) -> None:  # noqa: ANN001
    subject, sae, down, ids = tiny_setup
    setup = prepare(subject, sae, down, ids, LabelOptions(alphas="auto", per_type=5))
    acts = setup.primary.numpy()
    freq = (acts > 1e-6).mean(0)
    band = (freq >= 0.002) & (freq <= 0.5)
    want = float(np.median(np.maximum(np.quantile(acts[:, band], 0.95, axis=0), 1.0)))
    assert setup.alphas == [pytest.approx(want)]


# ------------------------------------------------------------------- the CLI job
@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):  # noqa: ANN201
    root = tmp_path_factory.mktemp("saes")
    tiny_sae(128, 24, hook="blocks.0.hook_resid_post").module.save_model(str(root / "up"))
    tiny_sae(128, 20, hook="blocks.1.hook_resid_post", seed=1).module.save_model(str(root / "dn"))
    return root


def _job(out: Path, sae_dirs: Path, **kw) -> Path:  # noqa: ANN003
    args = dict(model=None, sae=str(sae_dirs / "up"), downstream_sae=str(sae_dirs / "dn"),
                n_contexts=40, context_length=12, options=LabelOptions(per_type=4), shard_size=5)
    args.update(kw)
    return run_labels(out, **args)


def test_run_labels_writes_table_and_resumes(tmp_path: Path, sae_dirs: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    whole = pd.read_parquet(_job(tmp_path / "whole", sae_dirs))
    assert list(whole["feature"]) == list(range(24))
    meta = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert meta["n_features"] == 24 and meta["alphas"] == [1.0] and meta["engine_fast_path"]

    real = labels_mod.compute_labels
    calls: list[int] = []

    def dies_on_third(setup, feats):  # noqa: ANN001, ANN202
        calls.append(feats[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(setup, feats)

    monkeypatch.setattr(labels_mod, "compute_labels", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path / "resumed", sae_dirs)
    assert not (tmp_path / "resumed" / "labels.parquet").exists()
    calls.clear()
    monkeypatch.setattr(labels_mod, "compute_labels", lambda s, f: calls.append(f[0]) or real(s, f))
    resumed = pd.read_parquet(_job(tmp_path / "resumed", sae_dirs))
    assert calls == [10, 15, 20]  # shards 0 and 1 were reused
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)


def test_feature_subsets_are_consistent(tmp_path: Path, sae_dirs: Path) -> None:
    """A feature's labels do not depend on which other features are labelled."""
    some = pd.read_parquet(_job(tmp_path / "a", sae_dirs, features="3,17,5-6"))
    first = pd.read_parquet(_job(tmp_path / "b", sae_dirs, features="18"))
    assert list(some["feature"]) == [3, 17, 5, 6] and len(first) == 18
    pd.testing.assert_frame_equal(
        some[some.feature.isin([3, 5, 6, 17])].sort_values("feature").reset_index(drop=True),
        first[first.feature.isin([3, 5, 6, 17])].sort_values("feature").reset_index(drop=True),
        atol=1e-5, rtol=0,
    )


@pytest.mark.parametrize(("kw", "match"), [
    (dict(features="25"), "more than"),
    (dict(features="1,99"), "out of range"),
    (dict(features="a,b"), "cannot read"),
    (dict(downstream_sae="up"), "not after the steering site"),
    (dict(options=LabelOptions(alphas=())), "grid is empty"),
    (dict(options=LabelOptions(alphas=(1.0, math.nan))), "not finite"),
    (dict(context_length=1), "too short"),
])
def test_bad_input_fails_before_any_table(tmp_path: Path, sae_dirs: Path, kw, match) -> None:  # noqa: ANN001
    if kw.get("downstream_sae") == "up":
        kw = dict(downstream_sae=str(sae_dirs / "up"))
    with pytest.raises(SteerscopeError, match=match):
        _job(tmp_path / "out", sae_dirs, **kw)
    assert not (tmp_path / "out" / "labels.parquet").exists()


@pytest.mark.parametrize(("alpha", "match"), [("", "empty"), ("1,inf", "not finite"),
                                              ("x", "cannot read"), ("nan", "not finite")])
def test_alpha_parsing(alpha: str, match: str) -> None:
    with pytest.raises(SteerscopeError, match=match):
        parse_alphas(alpha)
    assert parse_alphas("0.5, 1,2") == (0.5, 1.0, 2.0) and parse_alphas("auto") == "auto"


def test_cli_one_line_errors(tmp_path: Path, sae_dirs: Path) -> None:
    from steerscope.cli import app

    base = ["labels", "--out", str(tmp_path / "o"), "--sae", str(sae_dirs / "up"),
            "--downstream-sae", str(sae_dirs / "dn"), "--contexts", "40", "--context-length", "12"]
    for extra, match in [(["--features", "0,24"], "out of range"), (["--alpha", "nan"], "finite"),
                         (["--context-length", "1"], "too short")]:
        result = CliRunner().invoke(app, [*base, *extra])
        lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and match in lines[0], result.output
    result = CliRunner().invoke(app, [*base, "--features", "3"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(tmp_path / "o" / "labels.parquet")) == 3


def test_benchmark_runs_and_agrees(sae_dirs: Path) -> None:
    from steerscope.benchmarks.labels import bench_labels

    r = bench_labels(None, str(sae_dirs / "up"), str(sae_dirs / "dn"), n_contexts=40,
                     context_length=12, n_features=3)
    assert {"name", "baseline_s", "steerscope_s", "ratio", "max_abs_diff", "features_per_s",
            "baseline_features_per_s"} <= set(r)
    assert r["name"] == "labels" and r["max_abs_diff"] <= 1e-4 and r["n_features"] == 3
