"""The ``screen`` job end to end on the real TinyStories-656K model with small sparse SAEs.

The SAEs are random but calibrated on the model's activations so each latent fires on a few
percent of tokens (like a trained SAE); the run is shrunk (256 latents, short contexts) to take
seconds. What is checked: every file is written, evaluation.json has its keys, stages resume after
an interruption and are reused when nothing changed, changing an evaluation option recomputes
only the evaluation, and bad input ends with one line and exit code 2.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from steerscope.errors import SteerscopeError
from steerscope.pipeline import ScreenConfig, run_screen

D_SAE = 256


def _sparse_sae(subject, layer: int, path: Path, seed: int) -> None:  # noqa: ANN001
    """A random SAE whose latents fire on 1–5 % of tokens of the real model."""
    from conftest import tiny_sae

    from steerscope.assets import corpus_path
    from steerscope.corpus import load_contexts

    hook = f"blocks.{layer}.hook_resid_post"
    sae = tiny_sae(subject.d_model, D_SAE, "standard", hook=hook, seed=seed)
    ctx = load_contexts(subject.tokenizer, corpus_path("tinystories-train.txt"), 32,
                        max_contexts=64)
    x = subject.capture(ctx.ids, [hook])[hook][:, 1:].reshape(-1, subject.d_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pre = (x - sae.module.b_dec) @ sae.module.W_enc
        q = 0.95 + 0.04 * torch.rand(D_SAE, generator=g)
        sae.module.b_enc.copy_(-torch.stack([torch.quantile(pre[:, j], q[j])
                                             for j in range(D_SAE)]))
    sae.module.save_model(str(path))


@pytest.fixture(scope="module")
def saes(real_subject, tmp_path_factory) -> tuple[str, str]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("saes")
    paths = []
    for layer in (0, 1):
        p = root / f"relu-blocks.{layer}.hook_resid_post"
        _sparse_sae(real_subject, layer, p, seed=layer)
        paths.append(str(p))
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def cfg(saes: tuple[str, str], shared_data: Path) -> ScreenConfig:
    return ScreenConfig(
        sae=saes[0], downstream_sae=saes[1], model=str(shared_data / "tinystories-656k"),
        n_labelled=60, label_contexts=128, heldout_contexts=96, context_length=24,
        predictor_context_length=32, predictor_max_contexts=200, n_boot=100,
        models=("ridge",), n_cards=(2, 1), card_tokens=6,
    )


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def run_dir(cfg: ScreenConfig, tmp_path_factory) -> tuple[Path, dict]:  # noqa: ANN001
    """A run killed after predictors and labels, then resumed to the end."""
    out = tmp_path_factory.mktemp("screen") / "run"

    def stop_at_evaluation(what: str, _frac: float) -> None:
        if what.startswith("evaluation"):
            raise _Stop

    with pytest.raises(_Stop):
        run_screen(out, cfg, stop_at_evaluation)
    killed = {f: (out / f).is_file() for f in ("predictors.parquet", "labels.parquet",
                                               "report.html")}
    run = run_screen(out, cfg)
    return out, {"killed": killed, "reused": run.reused, "headline": run.headline}


def test_screen_job_writes_everything(run_dir: tuple[Path, dict]) -> None:
    out, info = run_dir
    assert info["killed"] == {"predictors.parquet": True, "labels.parquet": True,
                              "report.html": False}
    assert set(info["reused"]) == {"predictors", "labels"}  # resumed, not recomputed
    for f in ("predictors.parquet", "labels.parquet", "heldout_labels.parquet",
              "screen.parquet", "evaluation.json", "report.html", "manifest.json"):
        assert (out / f).is_file(), f
    assert not (out / ".work").exists()
    doc = json.loads((out / "evaluation.json").read_text())
    assert {"univariate", "cv", "heldout", "verdicts", "headline", "screen"} <= set(doc)
    assert doc["heldout"]["summary"]["contexts"] == "new"
    assert 0 < doc["screen"]["coverage"]["measured"] <= 1
    screen = pd.read_parquet(out / "screen.parquet")
    assert len(screen) == D_SAE and screen["rank"].tolist() == list(range(1, D_SAE + 1))
    assert set(screen["tier"]) <= {"clean", "uncertain", "messy"}
    labels = pd.read_parquet(out / "labels.parquet")
    assert len(labels) == 60 and screen["labelled"].sum() == 60
    held = pd.read_parquet(out / "heldout_labels.parquet")
    assert set(held["feature"]) <= set(labels["feature"])  # pool features, new contexts
    man = json.loads((out / "manifest.json").read_text())
    assert {"predictors", "labels", "evaluation", "heldout", "heldout_labels", "screen",
            "report"} <= set(man["stages"])
    assert man["config"]["n_labelled"] == 60 and man["versions"]["steerscope"]
    html = (out / "report.html").read_text()
    assert 'id="headline"' in html and html.count('class="card"') == 3
    assert info["headline"]["best"] is not None


def test_screen_job_reuses_what_did_not_change(
    cfg: ScreenConfig, run_dir: tuple[Path, dict],
) -> None:
    out, _ = run_dir
    doc = json.loads((out / "evaluation.json").read_text())
    again = run_screen(out, cfg)
    assert set(again.reused) >= {"predictors", "labels", "evaluation", "heldout", "screen",
                                 "report"}
    assert json.loads((out / "evaluation.json").read_text()) == doc
    changed = run_screen(out, replace(cfg, n_boot=101))
    assert {"predictors", "labels", "heldout_labels"} <= set(changed.reused)
    assert "evaluation" not in changed.reused


def test_an_edited_corpus_of_the_same_size_is_a_new_corpus(
    cfg: ScreenConfig, shared_data: Path, tmp_path: Path,
) -> None:
    """The stage cache is keyed by the corpus content, not its path or size."""
    corpus = tmp_path / "corpus.txt"
    text = (shared_data / "corpora" / "tinystories-train.txt").read_text(encoding="utf-8")
    corpus.write_text(text, encoding="utf-8")
    small = replace(cfg, corpus=str(corpus))
    out = tmp_path / "run"

    def stop_at_labels(what: str, _frac: float) -> None:
        if what.startswith("labels"):
            raise _Stop

    def predictor_key() -> str:
        return json.loads((out / "manifest.json").read_text())["stages"]["predictors"]["key"]

    with pytest.raises(_Stop):
        run_screen(out, small, stop_at_labels)
    first = predictor_key()
    i = text.index("Once")
    corpus.write_text(text[:i] + "Only" + text[i + 4:], encoding="utf-8")  # same size
    assert corpus.stat().st_size == len(text.encode())
    with pytest.raises(_Stop):
        run_screen(out, small, stop_at_labels)
    assert predictor_key() != first


def test_labels_from_another_sae_are_refused(
    cfg: ScreenConfig, run_dir: tuple[Path, dict], tmp_path: Path,
) -> None:
    src, _ = run_dir
    other = tmp_path / "other"
    other.mkdir()
    pd.read_parquet(src / "labels.parquet").to_parquet(other / "labels.parquet")
    (other / "manifest.json").write_text(json.dumps(
        {"model": "x", "sae": ["topk-blocks.0.hook_resid_post", "y"]}))
    with pytest.raises(SteerscopeError, match="different"):
        run_screen(tmp_path / "mixed", replace(cfg, predictors=str(src / "predictors.parquet"),
                                               labels=str(other / "labels.parquet")))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from steerscope.cli import app

    runner = CliRunner()
    out = tmp_path / "never"
    r = runner.invoke(app, ["screen", "--out", str(out), "--n-labelled", "10"])
    assert r.exit_code == 2
    msg = r.output.strip()
    assert "needs" in msg and "40" in msg and len(msg.splitlines()) == 1
    assert not out.exists()
    r = runner.invoke(app, ["screen", "--out", str(out), "--freq-band", "0.5"])
    assert r.exit_code == 2 and "--freq-band" in r.output
    r = runner.invoke(app, ["screen", "--out", str(out), "--alpha", "x"])
    assert r.exit_code == 2 and "--alpha" in r.output


@pytest.mark.slow
def test_default_screen_on_the_embedded_model(tmp_path: Path) -> None:
    """The README's main command, as a user runs it (minutes)."""
    from steerscope.assets import DEFAULT_SAE, embedded_sae_names
    from steerscope.cli import app

    if DEFAULT_SAE not in embedded_sae_names():
        pytest.skip("the embedded SAEs are not installed")
    r = CliRunner().invoke(app, ["screen", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and "held-out screening" in r.output
    assert (tmp_path / "run" / "report.html").is_file()


def test_feature_sample_is_evenly_spaced_through_the_frequency_band() -> None:
    from steerscope.pipeline import eligible, sample_features

    freq = np.concatenate([np.zeros(100), np.linspace(0.002, 0.5, 400), np.full(50, 0.9)])
    pred = pd.DataFrame({"feature": np.arange(len(freq)), "final_act_freq": freq})
    assert eligible(pred, (0.002, 0.5)).sum() == 400
    picked = sample_features(pred, 40, (0.002, 0.5))
    assert len(picked) == 40 and all(100 <= f < 500 for f in picked)
    gaps = np.diff(sorted(picked))
    assert gaps.max() - gaps.min() <= 1  # evenly spaced through the sorted list
    assert sample_features(pred, 1000, (0.002, 0.5)) == list(range(100, 500))
    with pytest.raises(SteerscopeError, match="needs at least 40"):
        sample_features(pred.iloc[:130], 40, (0.002, 0.5))


def test_an_sae_without_a_later_embedded_sae_needs_a_downstream_sae() -> None:
    from steerscope.pipeline import default_downstream

    with pytest.raises(SteerscopeError, match="--downstream-sae"):
        default_downstream("relu-blocks.1.hook_resid_post")
    with pytest.raises(SteerscopeError, match="--downstream-sae"):
        default_downstream("/some/dir/sae")


def test_labels_at_several_strengths_are_refused() -> None:
    from steerscope.pipeline import _single_alpha

    lab = pd.DataFrame({"feature": [0, 0, 1, 1], "alpha": [1.0, 2.0, 1.0, 2.0]})
    with pytest.raises(SteerscopeError, match="single --alpha"):
        _single_alpha(lab)


def test_all_embedded_runs_the_three_architectures(monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    import steerscope.pipeline as pl

    names = [f"{a}-blocks.{b}.hook_resid_post" for a in ("relu", "jumprelu", "topk")
             for b in (0, 1)]
    monkeypatch.setattr(pl.assets, "embedded_sae_names", lambda: names)
    calls = []
    monkeypatch.setattr(pl, "run_screen", lambda out, cfg, prog: calls.append((out, cfg)))
    pl.run_all_embedded(tmp_path, ScreenConfig(sae="ignored", downstream_sae="ignored"))
    assert [c.sae for _, c in calls] == [n for n in names if "blocks.0" in n]
    assert all(c.downstream_sae is None for _, c in calls)  # each its own architecture's block 1
    assert [o.name for o, _ in calls] == [c.sae for _, c in calls]
    assert pl.default_downstream("topk-blocks.0.hook_resid_post") == "topk-blocks.1.hook_resid_post"
    monkeypatch.setattr(pl.assets, "embedded_sae_names", lambda: names[:2])
    with pytest.raises(SteerscopeError, match="jumprelu-blocks.0.hook_resid_post"):
        pl.run_all_embedded(tmp_path, ScreenConfig())
