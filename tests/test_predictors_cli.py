"""``steerscope predictors`` end to end on the real TinyStories model with a small random SAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_sae
from typer.testing import CliRunner

from steerscope.cli import app
from steerscope.predictors import COLUMNS, PREDICTOR_SETS

runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only cost


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sae") / "wide"
    tiny_sae(128, 96, seed=3).module.save_model(str(path))
    return path


def test_cli_writes_table_and_manifest(
    tmp_path: Path, sae_dir: Path, shared_data: Path
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["predictors", "--out", str(out), "--sae", str(sae_dir),
                                 "--max-contexts", "48", "--context-length", "32"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "predictors.parquet")
    assert list(table.columns) == list(COLUMNS) and table["feature"].tolist() == list(range(96))
    assert np.isfinite(table["output_score"]).all()
    assert table["logit_lens_strings"].map(len).eq(20).all()  # real tokenizer: strings kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_contexts"] == 48 and manifest["positions"] == 48 * 31
    assert manifest["predictor_sets"] == {k: list(v) for k, v in PREDICTOR_SETS.items()}
    assert manifest["corpus_sha256"] and manifest["hook"] == "blocks.0.hook_resid_post"
    assert not (out / ".predictors-work").exists()  # work state removed once written


def _fails_cleanly(args: list[str], match: str, out: Path) -> None:
    result = runner.invoke(app, args)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and match in result.output
    assert not (out / "predictors.parquet").exists()


def test_cli_bad_input(tmp_path: Path, sae_dir: Path, shared_data: Path) -> None:
    out = tmp_path / "bad"
    _fails_cleanly(["predictors", "--out", str(out), "--sae", str(sae_dir),
                    "--max-contexts", "8"], "at least 20", out)
    tiny_sae(32, 16).module.save_model(str(tmp_path / "narrow"))
    _fails_cleanly(["predictors", "--out", str(out), "--sae", str(tmp_path / "narrow")],
                   "d_in=32", out)
    _fails_cleanly(["predictors", "--out", str(out), "--sae", str(sae_dir),
                    "--input-min-contexts", "0"], "not a range", out)
    nan_sae = tiny_sae(128, 96, seed=3)
    with torch.no_grad():
        nan_sae.module.b_enc[5] = float("nan")
    nan_sae.module.save_model(str(tmp_path / "nan"))
    _fails_cleanly(["predictors", "--out", str(out), "--sae", str(tmp_path / "nan"),
                    "--max-contexts", "48", "--context-length", "32"],
                   "SAE activation of feature 5 is nan in context 0 (position 1)", out)
