"""Predictors: every statistic against a naive dense computation on small random SAEs.

The streaming code never holds ``tokens x d_sae``; these tests do (the sizes are tiny) and
check the two agree, that crowding equals brute force, that Arad's scores equal the formulas
evaluated one feature at a time, and that shards / a resumed run give the identical table.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_llama, tiny_sae

from steerscope.errors import SteerscopeError
from steerscope.predictors import (
    COLUMNS,
    DUAN_PREDICTORS,
    PREDICTOR_SETS,
    PredictorConfig,
    compute_predictors,
    predictor_set,
)
from steerscope.predictors.activation import MomentStats, QuantileSketch, SparseActs
from steerscope.predictors.coactivation import Coactivation
from steerscope.predictors.geometry import decoder_geometry
from steerscope.predictors.logits import direct_logit_footprint, logit_lens_tokens
from steerscope.predictors.pipeline import corpus_pass, feature_table
from steerscope.predictors.scores import TopContexts, input_scores, output_scores

PROMPT = [1, 5, 9, 13, 7]  # BOS + 4 tokens: tiny_llama has no tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only cost


def sparse_matrix(n: int, d: int, seed: int, density: float = 0.15) -> torch.Tensor:
    """Non-negative sparse activations with some features dead and some dense."""
    g = torch.Generator().manual_seed(seed)
    rate = torch.rand(d, generator=g) * density * 2
    rate[:3] = torch.tensor([0.0, 0.97, 0.5])
    fire = torch.rand(n, d, generator=g) < rate
    vals = torch.rand(n, d, generator=g).pow(2) * 3 + 1e-7
    return torch.where(fire, vals, torch.zeros(()))


def naive_moments(a: np.ndarray, thr: float = 1e-6) -> dict[str, np.ndarray]:
    n = a.shape[0]
    p = (a > thr).mean(0)
    mean = a.mean(0)
    var = a.var(0)
    c4 = ((a - mean) ** 4).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kurt = np.where(var > 0, c4 / var**2, np.nan)
        s = a.sum(0)
        q = a / s
        h = -np.nansum(np.where(a > 0, q * np.log(np.where(a > 0, q, 1)), 0), axis=0)
        ent = np.where(s > 0, h / math.log(n), np.nan)
        be = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)
               + np.where(p < 1, (1 - p) * np.log(np.where(p < 1, 1 - p, 1)), 0))
    return {
        "act_freq": p, "act_mean": mean, "act_std": np.sqrt(var), "act_max": a.max(0),
        "act_q95": np.quantile(a, 0.95, axis=0, method="inverted_cdf"),
        "act_kurtosis": kurt, "binary_entropy": be, "activation_entropy_norm": ent,
    }


def feed_moments(a: torch.Tensor, cuts: list[int]) -> MomentStats:
    stats = MomentStats(a.shape[1])
    edges = [0, *cuts, a.shape[0]]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sp = SparseActs.from_dense(a[lo:hi])
        stats.update(sp.cols, sp.vals, hi - lo)
    return stats


# ---------------------------------------------------------------------------------- activation
def test_moments_equal_naive_dense_and_streaming_equals_one_shot() -> None:
    a = sparse_matrix(500, 40, seed=0)
    one = feed_moments(a, []).finalize("token_")
    streamed = feed_moments(a, [7, 8, 130, 499]).finalize("token_")
    naive = naive_moments(a.double().numpy())
    for key, want in naive.items():
        got = one[f"token_{key}"]
        if key == "act_q95":
            assert np.all(np.abs(got - want) <= 0.01 * want + 1e-12), key
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=key)
        np.testing.assert_allclose(streamed[f"token_{key}"], got, rtol=1e-12, atol=1e-15)
    assert one["token_act_freq"][0] == 0 and math.isnan(one["token_act_kurtosis"][0])


def test_sparse_and_dense_codes_give_the_same_entries() -> None:
    a = sparse_matrix(50, 30, seed=9)
    dense, coo = SparseActs.from_dense(a), SparseActs.from_dense(a.to_sparse())
    for key in ("rows", "cols", "vals"):
        assert torch.equal(getattr(dense, key), getattr(coo, key))
    keep = torch.arange(50) % 3 == 0
    sub = dense.select_rows(keep)
    assert torch.equal(SparseActs.from_dense(a[keep]).rows, sub.rows) and sub.n_rows == 17


def test_quantile_sketch_error_bound() -> None:
    g = torch.Generator().manual_seed(3)
    n = 2000
    vals = torch.exp(torch.randn(n, 6, generator=g) * 4)  # spans ~1e-7 .. 1e7
    vals[:, 1] = 0.0
    vals[: n // 2, 2] = 0.0  # q95 in the positive part
    vals[:, 3] = torch.linspace(1e-6, 5e-5, n)  # below the sketch range
    sk = QuantileSketch(6, alpha=0.01, lo=1e-4, hi=1e4)
    cols = torch.arange(6).repeat(n)
    sk.update(cols, vals.reshape(-1))
    got = sk.quantile(0.95, n, vals.max(0).values).numpy()
    want = np.quantile(vals.double().numpy(), 0.95, axis=0, method="inverted_cdf")
    for j in range(6):
        if want[j] > 1e4:
            assert got[j] == pytest.approx(float(vals[:, j].max()))
        elif want[j] < 1e-4:
            assert abs(got[j] - want[j]) <= 1e-4
        else:
            assert abs(got[j] - want[j]) <= 0.01 * want[j] + 1e-12
    assert got[1] == 0.0


# ---------------------------------------------------------------------------------- co-activation
def naive_coact(a: np.ndarray, panel: np.ndarray) -> tuple[np.ndarray, ...]:
    b = (a > 1e-6).astype(np.int64)
    c = (b.T @ b)[:, panel].astype(np.float64)
    for j, f in enumerate(panel):
        c[f, j] = 0
    fires = b.sum(0)
    total = c.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = c / total[:, None]
        h = -np.nansum(np.where(c > 0, q * np.log(np.where(c > 0, q, 1)), 0), axis=1)
        mean = np.where(fires > 0, total / fires, np.nan)
        ent = np.where(fires > 0, np.where(total > 0, h / math.log(len(panel)), 0), np.nan)
    return c, mean, ent, fires


@pytest.mark.parametrize("panel_size,warmup", [(64, 10**9), (16, 10**9), (16, 120)])
def test_coactivation_equals_dense_counts(panel_size: int, warmup: int) -> None:
    a = sparse_matrix(400, 64, seed=1)
    co = Coactivation(64, panel_size, warmup, top_partners=5)
    for lo in range(0, 400, 70):
        sp = SparseActs.from_dense(a[lo:lo + 70])
        fire = sp.vals > 1e-6
        co.update(sp.rows[fire], sp.cols[fire], sp.n_rows)
    out = co.finalize()
    # The panel: most frequent features over the warm-up prefix (all of it when it is longer).
    seen = a[: (min(warmup, 400) + 69) // 70 * 70] if warmup < 400 else a
    freq = (seen > 1e-6).sum(0)
    order = torch.sort(freq, descending=True, stable=True).indices[:panel_size]
    panel = np.sort(order.numpy())
    np.testing.assert_array_equal(co.panel.numpy(), panel)
    c, mean, ent, fires = naive_coact(a.double().numpy(), panel)
    np.testing.assert_allclose(out["coact_count_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(out["coact_entropy_norm"], ent, rtol=1e-9, atol=1e-12)
    for f in (1, 5, 17):
        frac = np.sort(c[f] / fires[f])[::-1][:5]
        np.testing.assert_allclose(np.sort(out["coact_top_partner_frac"][f])[::-1], frac[frac > 0])
        for j, fr in zip(out["coact_top_partners"][f], out["coact_top_partner_frac"][f],
                         strict=True):
            assert c[f, list(panel).index(j)] / fires[f] == pytest.approx(fr)


# ---------------------------------------------------------------------------------- top contexts
def test_top_contexts_are_batch_invariant_and_break_ties_by_context() -> None:
    n_ctx, width, d = 30, 6, 12
    a = sparse_matrix(n_ctx * width, d, seed=2, density=0.3)
    a[5 * width:6 * width] = a[2 * width:3 * width]  # context 5 ties context 2 everywhere
    tokens = torch.randint(0, 50, (n_ctx * width,), generator=torch.Generator().manual_seed(0))
    context = torch.arange(n_ctx).repeat_interleave(width)

    def run(step: int) -> TopContexts:
        top = TopContexts(d, k=8)
        for lo in range(0, n_ctx, step):
            rows = slice(lo * width, min(n_ctx, lo + step) * width)
            sp = SparseActs.from_dense(a[rows])
            f = sp.vals > 1e-6
            top.update(sp.rows[f], sp.cols[f], sp.vals[f], context[rows], tokens[rows])
        return top

    one, many = run(n_ctx), run(4)
    for key in ("values", "context", "token", "n_contexts"):
        assert torch.equal(getattr(one, key), getattr(many, key)), key
    per_ctx = a.view(n_ctx, width, d)
    for f in range(d):
        mx, arg = per_ctx[:, :, f].max(1)
        firing = [c for c in range(n_ctx) if mx[c] > 1e-6]
        order = sorted(firing, key=lambda c: (-float(mx[c]), c))[:8]
        assert one.context[f, :len(order)].tolist() == order
        assert one.token[f, :len(order)].tolist() == [
            int(tokens[c * width + int((per_ctx[c, :, f] == mx[c]).nonzero()[0])]) for c in order
        ]
        assert int(one.n_contexts[f]) == len(firing)


def test_input_score_formula_and_minimum_contexts() -> None:
    top = torch.tensor([[3, 4, 5, 3, -1], [7, 7, 7, 7, 7], [1, 2, -1, -1, -1]])
    lens = torch.tensor([[3, 9], [1, 2], [1, 2]])
    out = input_scores(top, torch.tensor([4, 9, 2]), lens, min_contexts=3, max_contexts=5)
    assert out["input_score"][0] == pytest.approx(2 / 4)
    assert out["input_score"][1] == 0.0 and out["input_score_n_contexts"][1] == 5
    assert math.isnan(out["input_score"][2]) and "only 2 firing contexts" in \
        out["input_score_reason"][2]
    assert out["input_score_reason"][0] is None


# ---------------------------------------------------------------------------------- geometry
def test_crowding_equals_brute_force_across_tiles() -> None:
    sae = tiny_sae(16, 70, seed=4)
    with torch.no_grad():
        sae.W_dec[3] = sae.W_dec[9] * -2  # an exact anti-duplicate: |cos| = 1
    got = decoder_geometry(sae.W_enc, sae.W_dec, k=20, row_chunk=16, col_chunk=24)
    dec, enc = sae.W_dec.detach().double(), sae.W_enc.detach().double().T
    unit = dec / dec.norm(dim=1, keepdim=True)
    sims = (unit @ unit.T).abs()
    sims.fill_diagonal_(-1)
    top = sims.sort(1, descending=True).values[:, :20]
    np.testing.assert_allclose(got["crowding_max_abs_cos"], top[:, 0], atol=1e-6)
    np.testing.assert_allclose(got["crowding_topk_mean_abs_cos"], top.mean(1), atol=1e-6)
    np.testing.assert_allclose(got["crowding_topk_sum_abs_cos"], top.sum(1), atol=1e-5)
    assert got["crowding_max_abs_cos"][3] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(got["decoder_norm"], dec.norm(dim=1), rtol=1e-6)
    np.testing.assert_allclose(got["encoder_norm"], enc.norm(dim=1), rtol=1e-6)
    cos = (dec * enc).sum(1) / dec.norm(dim=1) / enc.norm(dim=1)
    np.testing.assert_allclose(got["encoder_decoder_cos"], cos, atol=1e-6)
    part = decoder_geometry(sae.W_enc, sae.W_dec, slice(30, 50), k=20)
    np.testing.assert_allclose(part["crowding_max_abs_cos"], got["crowding_max_abs_cos"][30:50])


# ---------------------------------------------------------------------------------- logits
def test_direct_logit_footprint_and_logit_lens_equal_naive() -> None:
    subject = tiny_llama()
    sae = tiny_sae(32, 40)
    w_dec = sae.W_dec.detach()
    got = direct_logit_footprint(w_dec, subject.W_U, ks=(10, 50, 100, 500), chunk=7)
    r = (w_dec.double() @ subject.W_U.detach().double())
    q = r.abs() / r.abs().sum(1, keepdim=True)
    ent = -(q * q.log()).sum(1)
    np.testing.assert_allclose(got["direct_logit_l2"], r.norm(dim=1), rtol=1e-5)
    np.testing.assert_allclose(got["direct_logit_linf"], r.abs().max(1).values, rtol=1e-5)
    np.testing.assert_allclose(got["direct_logit_entropy"], ent, rtol=1e-5)
    np.testing.assert_allclose(got["direct_logit_effective_vocab"], ent.exp(), rtol=1e-5)
    for k in (10, 50):
        want = q.sort(1, descending=True).values[:, :k].sum(1)
        np.testing.assert_allclose(got[f"direct_top{k}_abs_mass_frac"], want, rtol=1e-5)
    np.testing.assert_allclose(got["direct_top500_abs_mass_frac"], 1.0, rtol=1e-6)  # vocab 64
    lens = logit_lens_tokens(subject, w_dec, k=20, memory_mb=0.01)
    with torch.no_grad():
        naive = torch.softmax(subject.model.lm_head(subject.model.model.norm(w_dec)), -1)
    assert torch.equal(lens, naive.topk(20, dim=1).indices)


# ---------------------------------------------------------------------------------- output score
def naive_output_score(subject, sae, feature: int, lens: torch.Tensor, factor: float) -> float:
    """Arad's ``get_output_score``: one hooked forward per feature (methods.md §1.9)."""

    def hook(x: torch.Tensor) -> torch.Tensor:
        a = sae.encode(x)
        err = x.double() - sae.decode(a).double()
        sae.encode(x)  # SAELens norm statistics last for one decode
        a = a.clone()
        a[:, -1, feature] += factor * a[:, -1, :].max()
        return (sae.decode(a).double() + err).to(x.dtype)

    logits = subject.run_with_edit(torch.tensor([PROMPT]), sae.hook, hook)
    p = torch.softmax(logits[0, -1].double(), -1)
    rank = torch.argsort(torch.argsort(-p))
    return float((1 - rank[lens].min().double() / len(p)) * p[lens].max())


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_output_scores_equal_one_forward_per_feature(arch: str) -> None:
    subject = tiny_llama()
    sae = tiny_sae(32, 48, arch=arch, hook="blocks.0.hook_resid_post", seed=5)
    lens = logit_lens_tokens(subject, sae.W_dec.detach(), k=20)
    got = output_scores(subject, sae, lens, prompt=PROMPT, factor=10.0, memory_mb=0.05)
    want = [naive_output_score(subject, sae, f, lens[f], 10.0) for f in range(48)]
    np.testing.assert_allclose(got["output_score"], want, atol=1e-6)
    clean = [naive_output_score(subject, sae, f, lens[f], 0.0) for f in range(0, 48, 5)]
    np.testing.assert_allclose(got["output_score_clean"][::5], clean, atol=1e-6)
    np.testing.assert_allclose(
        got["output_score_delta"], got["output_score"] - got["output_score_clean"]
    )


def test_output_scores_of_a_rescaling_sae_take_the_general_path() -> None:
    from sae_lens import StandardSAE, StandardSAEConfig

    from steerscope.saes import SAE

    subject = tiny_llama()
    torch.manual_seed(8)
    module = StandardSAE(StandardSAEConfig(d_in=32, d_sae=24, normalize_activations="layer_norm"))
    with torch.no_grad():
        module.W_enc.copy_(torch.randn(32, 24) / 32**0.5)
        module.W_dec.copy_(torch.randn(24, 32))
    sae = SAE(module=module.eval(), name="ln", hook="blocks.0.hook_resid_post")
    lens = logit_lens_tokens(subject, sae.W_dec.detach(), k=20)
    got = output_scores(subject, sae, lens, prompt=PROMPT, factor=10.0)
    want = [naive_output_score(subject, sae, f, lens[f], 10.0) for f in range(24)]
    np.testing.assert_allclose(got["output_score"], want, atol=1e-6)


# ---------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def setup() -> tuple:
    subject = tiny_llama()
    sae = tiny_sae(32, 96, seed=6)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 64, (40, 12), generator=g)
    ids[:, 0] = 1
    return subject, sae, ids


def config(**kw) -> PredictorConfig:
    base = {"prompt": PROMPT, "batch_tokens": 10_000, "panel_size": 32, "lens_k": 5,
            "input_min_contexts": 20, "checkpoint_s": 0.0}
    return PredictorConfig(**{**base, **kw})


def test_table_equals_naive_dense_computation(setup) -> None:
    subject, sae, ids = setup
    result = compute_predictors(subject, sae, ids, config())
    t = result.table
    assert list(t.columns) == list(COLUMNS) and len(t) == sae.d_sae
    assert t["feature"].tolist() == list(range(sae.d_sae))
    x = subject.capture(ids, [sae.hook])[sae.hook][:, 1:]  # BOS excluded
    a = sae.encode(x).double().numpy()  # [n, T-1, d_sae], dense: fine at this size
    for prefix, pop in (("token_", a.reshape(-1, sae.d_sae)), ("final_", a[:, -1])):
        for key, want in naive_moments(pop).items():
            got = t[prefix + key].to_numpy()
            if key == "act_q95":
                assert np.all(np.abs(got - want) <= 0.01 * want + 1e-9)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=key)
    # co-activation panel = the 32 most frequent features over all positions
    flat = a.reshape(-1, sae.d_sae)
    freq = torch.from_numpy((flat > 1e-6).sum(0))
    panel = np.sort(torch.sort(freq, descending=True, stable=True).indices[:32].numpy())
    _, mean, ent, _ = naive_coact(flat, panel)
    np.testing.assert_allclose(t["coact_count_mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(t["coact_entropy_norm"], ent, rtol=1e-9, atol=1e-12)
    # input score: peak token of each firing context, top 100 by context max
    lens = np.stack(t["logit_lens_tokens"].to_numpy())
    toks = ids[:, 1:].numpy()
    for f in range(0, sae.d_sae, 7):
        mx = a[:, :, f].max(1)
        ctxs = sorted((c for c in range(len(ids)) if mx[c] > 1e-6), key=lambda c: (-mx[c], c))
        peaks = [toks[c, int(np.argmax(a[c, :, f]))] for c in ctxs[:100]]
        if len(peaks) < 20:
            assert math.isnan(t["input_score"][f]) and t["input_score_reason"][f]
        else:
            assert t["input_score"][f] == pytest.approx(np.isin(peaks, lens[f]).mean())
    assert result.info["panel"]["exact"]


def test_coactivation_budget_counts_every_kth_context(setup) -> None:
    subject, sae, ids = setup
    t = compute_predictors(subject, sae, ids, config(coact_max_positions=150, panel_size=96))
    x = subject.capture(ids, [sae.hook])[sae.hook][:, 1:]
    a = sae.encode(x).double().numpy()[::3]  # ceil(40 * 11 / 150) = 3
    _, mean, ent, _ = naive_coact(a.reshape(-1, sae.d_sae), np.arange(sae.d_sae))
    np.testing.assert_allclose(t.table["coact_count_mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(t.table["coact_entropy_norm"], ent, rtol=1e-9, atol=1e-12)
    assert t.info["coactivation"] == {"positions": 14 * 11, "context_stride": 3,
                                      "symmetric_blocks": 4}


def test_streaming_batches_equal_one_shot(setup) -> None:
    subject, sae, ids = setup
    one = compute_predictors(subject, sae, ids, config()).table
    streamed = compute_predictors(subject, sae, ids, config(batch_tokens=30)).table
    for col in COLUMNS:
        if not pd.api.types.is_numeric_dtype(one[col]):  # lists and reasons: exactly equal
            pd.testing.assert_series_equal(streamed[col], one[col], check_exact=True)
            continue
        # float64 running sums in another order: equal to rounding
        np.testing.assert_allclose(
            streamed[col].to_numpy(float), one[col].to_numpy(float), rtol=1e-9, atol=1e-12,
            err_msg=col,
        )


def test_table_split_in_shards_equals_one_run(setup) -> None:
    """Feature shards computed separately (as independent workers would, in any order) join
    into the table of one run, and the shard size changes no value."""
    subject, sae, ids = setup
    cfg = config(shard_features=40)  # 96 features: shards of 40, 40, 16
    stats = corpus_pass(subject, sae, ids, cfg)
    parts = {i: feature_table(subject, sae, stats, cfg, only_shards=[i]) for i in (2, 0, 1)}
    joined = pd.concat([parts[0], parts[1], parts[2]], ignore_index=True)
    whole = compute_predictors(subject, sae, ids, cfg).table
    pd.testing.assert_frame_equal(joined, whole, check_exact=True)
    single = compute_predictors(subject, sae, ids, config(shard_features=10_000)).table
    pd.testing.assert_frame_equal(single, whole, check_exact=True)


class Kill(Exception):
    pass


@pytest.mark.parametrize("stage,at", [("corpus", 13), ("features", 32)])
def test_resume_after_kill_gives_identical_table(setup, tmp_path, stage: str, at: int) -> None:
    subject, sae, ids = setup
    cfg = config(batch_tokens=33, shard_features=32)
    full = compute_predictors(subject, sae, ids, cfg).table

    def killer(name: str, done: int, total: int) -> None:
        if name == stage and done >= at:
            raise Kill

    with pytest.raises(Kill):
        compute_predictors(subject, sae, ids, cfg, work_dir=tmp_path, progress=killer)
    seen: list[tuple[str, int]] = []
    resumed = compute_predictors(
        subject, sae, ids, cfg, work_dir=tmp_path, progress=lambda s, d, n: seen.append((s, d))
    ).table
    assert seen[0] == ("corpus", 15 if stage == "corpus" else 40)  # resumed, not restarted
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)


def test_bad_input_fails_cleanly(setup) -> None:
    subject, sae, ids = setup
    with pytest.raises(SteerscopeError, match="at least 20"):
        compute_predictors(subject, sae, ids[:10], config())
    with pytest.raises(SteerscopeError, match="d_in=16"):
        compute_predictors(subject, tiny_sae(16, 32), ids, config())
    bad = tiny_sae(32, 96, seed=6)
    with torch.no_grad():
        bad.module.b_enc[17] = float("nan")
    with pytest.raises(SteerscopeError, match=r"feature 17 is nan in context 0 \(position 1\)"):
        compute_predictors(subject, bad, ids, config())
    with pytest.raises(SteerscopeError, match="unknown predictor set"):
        predictor_set("nope")


def test_skip_nonfinite_drops_the_contexts(setup) -> None:
    subject, sae, ids = setup

    def poison(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        if x.shape[:2] == ids.shape:
            x[3, 4] = float("inf")
        return x

    def run(skip: bool):
        with subject.hooks(edits={sae.hook: poison}):
            return compute_predictors(subject, sae, ids, config(skip_nonfinite=skip))

    with pytest.raises(SteerscopeError, match=r"not finite in context 3 \(position 4\)"):
        run(False)
    result = run(True)
    assert result.info["skipped_nonfinite_contexts"] == [3]
    assert result.info["positions"] == (len(ids) - 1) * (ids.shape[1] - 1)


def test_predictor_sets_follow_duan() -> None:
    assert set(PREDICTOR_SETS) == {
        "freq_only", "activation_magnitude_only", "geometry", "crowding", "direct_logit",
        "coactivation", "activation_shape", "compact_no_magnitude", "full_no_magnitude",
        "full_all",
    }
    assert set(DUAN_PREDICTORS) <= set(COLUMNS)
    for cols in PREDICTOR_SETS.values():
        assert cols and set(cols) <= set(DUAN_PREDICTORS)
    assert PREDICTOR_SETS["freq_only"] == ("token_act_freq", "final_act_freq")
    assert "token_act_q95" not in PREDICTOR_SETS["full_no_magnitude"]
    assert predictor_set("geometry_only") == list(PREDICTOR_SETS["geometry"])
    assert predictor_set("crowding", ["crowding_max_abs_cos", "x"]) == ["crowding_max_abs_cos"]
