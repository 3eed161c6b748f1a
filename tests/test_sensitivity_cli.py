"""``steerscope sensitivity`` / ``bench sensitivity`` end to end on the real model, small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_sae
from typer.testing import CliRunner

from steerscope.cli import app

runner = CliRunner()
SMALL = ["--contexts", "3", "--stats-contexts", "4", "--context-length", "48", "--lengths",
         "0.1,0.5", "--runs", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saes")
    out = {}
    for name, hook in (("here", "blocks.0.hook_resid_post"), ("there", "blocks.1.hook_resid_post")):
        tiny_sae(128, 256, hook=hook).module.save_model(str(root / name))
        out[name] = root / name
    return out


def _fails_cleanly(args: list[str], match: str, out: Path) -> None:
    result = runner.invoke(app, args)
    text = result.output
    assert result.exit_code == 2, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert match in text, text
    assert not out.exists() or not any(out.iterdir())  # no partial output


def test_sensitivity_writes_table_html_and_manifest(
    tmp_path: Path, shared_data: Path, sae_dirs: dict[str, Path]
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["sensitivity", "--out", str(out), *SMALL, "--positions", "both",
                                 "--sae", str(sae_dirs["here"])])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "sensitivity.parquet")
    sweeps = table[table["panel"] != "substitution"]
    # 6 baselines + 3 feature categories (if populated) + error, × 2 lengths × 2 policies
    assert set(sweeps["positions"]) == {"all", "last"}
    assert len(sweeps[sweeps["sae"] == ""]) == 6 * 2 * 2
    assert {"kl_mean", "kl_lo", "kl_hi", "l2_mean", "length_abs", "length_rel"} <= set(table)
    page = (out / "sensitivity.html").read_text()
    assert "data:image/png;base64," in page
    manifest = json.loads((out / "sensitivity.json").read_text())
    assert manifest["site"] == "blocks.0.hook_resid_post"
    assert "cov_mixture_over_isotropic" in manifest["findings"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_sensitivity_bad_input(
    tmp_path: Path, shared_data: Path, sae_dirs: dict[str, Path]
) -> None:
    out = tmp_path / "bad"
    base = ["sensitivity", "--out", str(out), "--no-sae"]
    _fails_cleanly([*base, *SMALL[:6], "--lengths", "0,-1"], "positive and finite", out)
    _fails_cleanly([*base, *SMALL[:6], "--lengths", "0.1,x"], "comma-separated", out)
    _fails_cleanly([*base, *SMALL[:6], "--lengths", "0.1,nan"], "positive and finite", out)
    _fails_cleanly([*base, *SMALL[:6], "--positions", "middle"], "position policy", out)
    _fails_cleanly(["sensitivity", "--out", str(out), *SMALL, "--sae", str(sae_dirs["there"])],
                   "not at the perturbed site", out)
    few = ["--contexts", "2", "--stats-contexts", "1", "--context-length", "16", "--lengths",
           "0.1", "--runs", "1"]
    _fails_cleanly([*base, *few], "at least 129", out)
    ok = runner.invoke(app, [*base, *few, "--shrinkage", "auto"])
    assert ok.exit_code == 0, ok.output
    assert (out / "sensitivity.parquet").is_file()


def test_bench_sensitivity_keys(tmp_path: Path, shared_data: Path) -> None:
    path = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "sensitivity", "--json", str(path), "--contexts", "4",
                                 "--directions", "1", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    for key in ("name", "baseline_s", "steerscope_s", "ratio", "max_abs_diff", "features_per_s",
                "baseline_features_per_s", "ratio_all_positions", "ceiling_all_positions",
                "max_abs_diff_all_positions"):
        assert key in data, key
    assert data["name"] == "sensitivity"
    assert data["max_abs_diff"] <= 1e-5 and data["max_abs_diff_all_positions"] <= 1e-5
