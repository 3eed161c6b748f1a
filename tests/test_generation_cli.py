"""``steerscope generate-eval`` end to end on the real TinyStories model with a small random SAE,
and its bad-input paths (one clear line, exit ≠ 0, no partial table)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_sae
from typer.testing import CliRunner

from steerscope.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gen")
    sae = tiny_sae(128, 64, hook="blocks.0.hook_resid_post", seed=5)
    sae.module.save_model(str(root / "sae"))
    prefixes = root / "prefixes.txt"
    prefixes.write_text("Once upon a time, \nOne day, \nThere was a \nThe next day, \n")
    return {"sae": str(root / "sae"), "model": str(shared_data / "tinystories-656k"),
            "prefixes": str(prefixes), "root": str(root)}


def _base(setup: dict[str, str], out: Path) -> list[str]:
    return ["generate-eval", "--out", str(out), "--sae", setup["sae"], "--model", setup["model"],
            "--features", "6", "--strengths", "0.4,3", "--prefixes", setup["prefixes"],
            "--max-new-tokens", "6", "--batch-size", "32"]


def _one_error_line(result, match: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and match in lines[-1], result.output
    assert sum(ln.startswith("error:") for ln in lines) == 1


@pytest.fixture(scope="module")
def run_dir(setup) -> Path:
    out = Path(setup["root"]) / "run"
    screen = Path(setup["root"]) / "screen.parquet"  # as the screening issue writes it
    pd.DataFrame({"feature": range(64), "pred_clean_score": [(f * 37) % 11 for f in range(64)],
                  "pred_lo": 0.0, "pred_hi": 1.0, "measured_clean_score": 1.0}).to_parquet(screen)
    result = runner.invoke(app, [*_base(setup, out), "--screen", str(screen)])
    assert result.exit_code == 0, result.output
    return out


def test_generate_eval_writes_table_filter_and_report(run_dir: Path) -> None:
    out = run_dir
    table = pd.read_parquet(out / "generation.parquet")
    # feature × strength (0 = unsteered, 0.4, 3) × prefix split
    assert len(table) == 6 * 3 * 2
    assert set(table["split"]) == {"select", "report"}
    assert (table["n_generations"] == 2).all()
    sel = table[table["selected"]]
    assert set(sel["split"]) == {"report", "select"} and sel["feature"].nunique() == 6
    data = json.loads((out / "filter.json").read_text())
    assert {"output_score", "headline", "note", "per_feature", "manifest"} <= set(data)
    assert [r["threshold"] for r in data["output_score"]][-1] == 0.9
    assert data["n_prefixes"] == {"select": 2, "report": 2}
    # the predicted clean score (pred_clean_score, not measured_/pred_lo) as a second filter
    assert len(data["clean_score"]) == 5 and len(data["both"]) == len(data["output_score"])
    pf = pd.DataFrame(data["per_feature"])
    assert (pf["clean_score"] == [(f * 37) % 11 for f in pf["feature"]]).all()
    assert len(data["fixed_strength"]) == 2  # one curve per strength of the grid
    page = (out / "generation.html").read_text()
    assert "data:image/png;base64," in page and "Arad" in page
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries


def test_predictors_table_and_skipped_clean_filter(setup, tmp_path: Path) -> None:
    """--predictors supplies the output scores and logit-lens tokens (issue 6's columns); without
    --screen the clean-score filters are skipped with the reason stated."""
    from steerscope.gen_metrics import logit_lens_topk
    from steerscope.saes import load_sae
    from steerscope.subject import Subject

    subject = Subject.load(setup["model"])
    lens = logit_lens_topk(subject, load_sae(setup["sae"], None), 20)
    scores = [(f * 0.013) % 1 for f in range(64)]  # distinguishable from any computed score
    pred = tmp_path / "predictors.parquet"
    pd.DataFrame({"feature": range(64), "output_score": scores,
                  "logit_lens_tokens": lens.tolist()}).to_parquet(pred)
    out = tmp_path / "p"
    res = runner.invoke(app, [*_base(setup, out), "--predictors", str(pred)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "filter.json").read_text())
    assert data["output_score_source"].startswith("predictors table")
    pf = pd.DataFrame(data["per_feature"])
    assert pf["output_score"].tolist() == pytest.approx([scores[f] for f in pf["feature"]])
    for r in data["output_score"]:  # the curve filters on exactly those scores
        assert r["n"] == sum(scores[f] >= r["threshold"] for f in pf["feature"])
    assert "clean_score" not in data and "screen.parquet" in data["clean_score_skipped"]
    assert "skipped" in data["note"] and "skipped" in (out / "generation.html").read_text()


def test_bad_input(setup, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    args = _base(setup, tmp_path / "a")
    args[args.index("--prefixes") + 1] = str(empty)
    _one_error_line(runner.invoke(app, args), "prefix list")
    assert not (tmp_path / "a").exists()

    # k = the whole vocabulary: every generated token "succeeds", GenSuccess > 3 everywhere
    args = [*_base(setup, tmp_path / "b"), "--k", "2048", "--stop", ""]
    res = runner.invoke(app, args)
    _one_error_line(res, "every strength was filtered out")
    assert "GenSuccess by strength: feature" in res.output and "0.4→" in res.output
    assert not (tmp_path / "b" / "generation.parquet").exists()

    args = _base(setup, tmp_path / "c")
    args[args.index("--strengths") + 1] = "0.4,nan"
    _one_error_line(runner.invoke(app, args), "not finite")

    wrong = tmp_path / "wrong_screen.parquet"  # written for a bigger SAE
    pd.DataFrame({"feature": range(100), "pred_clean_score": 1.0}).to_parquet(wrong)
    args = [*_base(setup, tmp_path / "d"), "--screen", str(wrong)]
    _one_error_line(runner.invoke(app, args), "d_sae=64")
    _one_error_line(runner.invoke(app, [*args, "--sae", setup["sae"] + "/"]), "one SAE")
    assert not (tmp_path / "d").exists()

    other = tmp_path / "other_run"  # right width, but its manifest names another SAE
    other.mkdir()
    pd.DataFrame({"feature": range(64), "pred_clean_score": 1.0}).to_parquet(
        other / "screen.parquet")
    (other / "manifest.json").write_text(json.dumps({"sae": "topk-blocks.0.hook_resid_post"}))
    args = [*_base(setup, tmp_path / "e"), "--screen", str(other / "screen.parquet")]
    _one_error_line(runner.invoke(app, args), "was written for SAE 'topk-blocks.0.hook_resid_post'")
    assert not (tmp_path / "e").exists()


def test_judge_failure_is_one_line_and_keeps_outputs(setup, tmp_path: Path, monkeypatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STEERSCOPE_JUDGE_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("STEERSCOPE_JUDGE_RETRIES", "0")
    out = tmp_path / "j"
    res = runner.invoke(app, [*_base(setup, out), "--judge", "--judge-features", "2"])
    _one_error_line(res, "judge endpoint")
    assert (out / "generation.parquet").is_file() and (out / "filter.json").is_file()


class _FakeJudge:
    """Rates by a rule; fails once after ``fail_after`` ratings, like a dying endpoint."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.calls = 0

    def rate_many(self, items, on_rating=None, done=()):
        from steerscope.judge import JudgeError, Rating

        out = list(done)
        have = {r.item for r in out}
        for i, (concept, instruction, _text) in enumerate(items):
            if i in have:
                continue
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise JudgeError("judge endpoint down", "retry", out)
            self.calls += 1
            assert concept.startswith("text that uses words such as")
            assert instruction.startswith("Continue this children's story: ")
            r = Rating(i, 2.0, 1.0, 2.0, 1.5, [])
            out.append(r)
            if on_rating:
                on_rating(r)
        return out


def test_judge_features_logs_and_resumes(run_dir: Path, tmp_path: Path) -> None:
    from steerscope.filtering import judge_features
    from steerscope.judge import JudgeError

    table = pd.read_parquet(run_dir / "generation.parquet")
    result = json.loads((run_dir / "filter.json").read_text())
    top = {int(f): ["a", "b"] for f in table["feature"].unique()}
    log = tmp_path / "judge.jsonl"
    with pytest.raises(JudgeError):
        judge_features(table, result, _FakeJudge(fail_after=3), top_tokens=top, n_features=3,
                       log=log)
    assert len(log.read_text().splitlines()) == 3  # completed ratings kept on disk
    again = _FakeJudge()
    summary = judge_features(table, result, again, top_tokens=top, n_features=3, log=log)
    assert again.calls == 3 * 2 - 3  # 3 features × 2 report prefixes, 3 already done
    assert summary["n_ratings"] == 6 and summary["mean_score"] == pytest.approx(1.5)


def test_several_saes_get_their_own_dirs_and_one_report(setup, tmp_path: Path) -> None:
    other = Path(setup["root"]) / "sae_topk"
    tiny_sae(128, 64, arch="topk", hook="blocks.1.hook_resid_post", seed=6).module.save_model(
        str(other))
    out = tmp_path / "multi"
    args = _base(setup, out)
    args[args.index("--features") + 1] = "3"
    res = runner.invoke(app, [*args, "--sae", str(other)])
    assert res.exit_code == 0, res.output
    for name in ("sae", "sae_topk"):
        assert (out / name / "generation.parquet").is_file()
        assert json.loads((out / name / "filter.json").read_text())["n_features"] <= 3
    page = (out / "generation.html").read_text()
    assert "ReLU" in page and "TopK" in page and page.count("<h3>") == 2


@pytest.mark.parametrize("positions", ["all", "last"])
def test_steer_uses_kv_cached_generation(setup, real_subject, monkeypatch, positions) -> None:
    """``steerscope steer`` goes through generate_requests (KV cache, per-row op), and its text
    equals a naive loop that re-runs the whole sequence every step and adds the decoder row by
    hand at the steered positions (the prompt per policy, every generated token)."""
    import steerscope.generation as gen
    from steerscope.generation import Sampling
    from steerscope.saes import load_sae
    from steerscope.steer import steer_side_by_side

    calls = []
    real = gen.generate_requests
    monkeypatch.setattr(gen, "generate_requests",
                        lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    prompt = "Once upon a time, there was a little "
    clean, steered = steer_side_by_side(
        prompt=prompt, feature=3, strength=40.0, sae=setup["sae"], model=setup["model"],
        positions=positions, sampling=Sampling(max_new_tokens=10))
    ops = [r.op for a, _ in calls for r in a[1]]
    assert ops[0] is None and ops[1].feature == 3 and ops[1].positions == positions
    assert all(k.get("use_cache", True) for _, k in calls)

    sae = load_sae(setup["sae"], None)
    tok = real_subject.tokenizer
    seq = list(tok(prompt)["input_ids"])
    start = 0 if positions == "all" else len(seq) - 1
    vec = 40.0 * sae.W_dec[3].detach()
    new = []
    for _ in range(10):
        def edit(x):
            x = x.clone()
            x[:, start:] += vec
            return x

        logits, _, _ = real_subject.forward(torch.tensor([seq]), edits={sae.hook: edit})
        nxt = int(logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        seq.append(nxt)
        new.append(nxt)
    assert steered == tok.decode(new, skip_special_tokens=True) and steered != clean



def test_all_embedded_runs_the_three_architectures_into_one_report(setup, tmp_path: Path) -> None:
    """--all-embedded: ReLU, JumpReLU and TopK at blocks.0, each in its own directory, and one
    combined report with a filter-curve panel per architecture."""
    out = tmp_path / "all"
    args = ["generate-eval", "--out", str(out), "--all-embedded", "--features", "4",
            "--strengths", "0.4,3", "--prefixes", setup["prefixes"], "--max-new-tokens", "4",
            "--batch-size", "32"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    archs = set()
    for arch in ("relu", "jumprelu", "topk"):
        data = json.loads((out / f"{arch}-blocks.0.hook_resid_post" / "filter.json").read_text())
        assert data["n_features"] == 4
        archs.add(data["architecture"])
    assert archs == {"standard", "jumprelu", "topk"}
    page = (out / "generation.html").read_text()
    assert page.count("data:image/png;base64,") >= 1
    for name in ("ReLU", "JumpReLU", "TopK"):
        assert name in page
    _one_error_line(runner.invoke(app, [*args, "--sae", setup["sae"]]), "--all-embedded")
