"""Benchmark of the sensitivity sweeps: batched paths vs the per-direction, per-length loop.

Both sides run in the same process on the same contexts, directions and lengths, and must give
the same per-token KL (``max_abs_diff``; target ≤ 1e-5):

* **last position** (``ratio``, target ≥ 10): the baseline runs one full forward of all
  contexts per (direction, length) with ``L·u`` added at the last position, as a script over
  the paper's protocol would; steerscope builds the clean prefix once (KV cache, timed) and
  replays every (direction, length, context) triple as one token.
* **all positions** (``ratio_all_positions``, no target): the baseline again runs one full
  forward per (direction, length), now with every non-BOS position perturbed; steerscope caches
  the clean site activations once and runs only the blocks above the site, batched. Every
  perturbation still needs those blocks over all positions, so the gain is bounded by
  ``ceiling_all_positions = n_layers / (n_layers − first changed block)`` (in block units; the
  unembedding is paid on both sides). The batched run also puts several (direction, length)
  pairs in one forward, which on a CPU is itself faster per token than the loop's one pair per
  forward, so ``ratio_all_positions`` can exceed the block ceiling;
  ``ratio_all_positions_skip_only`` times one pair per forward to isolate the skipped blocks.

Keys follow the other benchmarks (``name``, ``baseline_s``, ``steerscope_s``, ``ratio``,
``max_abs_diff``, ``features_per_s``, ``baseline_features_per_s``); a "feature" here is one
(direction, length) pair over all contexts. Both sides compute the same readouts (per-token
KL and the last-layer L2 change). ``*_cpu`` keys repeat the ratios in process CPU time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

PAPER_GRID = (*range(1, 20, 2), *range(20, 49, 4), *range(51, 92, 10))
DEFAULT_LENGTHS = tuple(v / 121 for v in PAPER_GRID)
"""The paper's normal grid (1, 3, …, 91 at GPT-2 layer 6's median norm 121; 23 lengths) as
fractions of the median norm, up to 0.75. Beyond it KL reaches 3–6 nats and the float32
rounding difference between a KV-cached one-token replay and a full forward (≈1e-5 in the
logits, both correct) approaches 1e-5 in KL; ``max_rel_diff`` shows the agreement is at float32
precision at every length."""


def bench_sensitivity(
    model: str | None = None,
    *,
    site: str | None = None,
    n_contexts: int = 32,
    context_length: int = 64,
    n_directions: int = 4,
    lengths: Sequence[float] = DEFAULT_LENGTHS,
    all_positions: bool = True,
    seed: int = 0,
    threads: int | None = None,
    repeats: int = 2,
) -> dict[str, Any]:
    """Time both sides on the embedded model (or ``model``); lengths are × the median norm.

    Both sides run under the same torch thread setting (``threads``; None: as the sweep
    chooses, see :func:`steerscope.sensitivity.runner.cpu_threads`). The sides alternate
    ``repeats`` times and each keeps its fastest wall time (and, separately, its least CPU
    time): on a shared machine the minimum is the stable estimate of a side's own cost."""
    from steerscope.assets import resolve_model
    from steerscope.sensitivity.runner import cpu_threads
    from steerscope.subject import Subject

    subject = Subject.load(resolve_model(model))
    with cpu_threads(subject, threads) as used:
        result = _bench(subject, site, n_contexts, context_length, n_directions, lengths,
                        all_positions, seed, max(1, repeats))
    result["threads"] = used
    return result


def _bench(
    subject: Any, site: str | None, n_contexts: int, context_length: int, n_directions: int,
    lengths: Sequence[float], all_positions: bool, seed: int, repeats: int,
) -> dict[str, Any]:
    from steerscope.assets import corpus_path
    from steerscope.corpus import load_contexts
    from steerscope.errors import SteerscopeError
    from steerscope.sensitivity.directions import base_directions
    from steerscope.sensitivity.runner import (
        DEFAULT_BATCH_TOKENS,
        AllPositionsRunner,
        LastPositionRunner,
        last_layer_site,
        layer_ceiling,
    )
    from steerscope.sensitivity.stats import check_lengths, kl_per_token, site_statistics
    from steerscope.sensitivity.sweep import DEFAULT_SITE, capture_site

    site = site or DEFAULT_SITE
    lengths = check_lengths(lengths)
    if n_directions < 1 or n_contexts < 1:
        raise SteerscopeError("benchmark needs at least one direction and one context",
                              "pass positive --directions and --contexts")
    subject.site(site)
    n_stats = max(8, -(-(subject.d_model + 1) // (context_length - 1)) * 2)
    ctx = load_contexts(subject.tokenizer, corpus_path("tinystories-train.txt"), context_length,
                        max_contexts=n_contexts + n_stats)
    ids, stats_ids = ctx.ids[:n_contexts], ctx.ids[n_contexts:]
    stats = site_statistics(capture_site(subject, stats_ids, site), site)
    g = torch.Generator().manual_seed(seed)
    dirs = base_directions("cov_mixture", torch.zeros(n_directions, subject.d_model), stats, g)
    lens = [v * stats.median_norm for v in lengths]
    pairs = [(d, length) for d in range(n_directions) for length in lens]
    n, t = ids.shape
    last = last_layer_site(subject)

    def naive(positions: slice) -> torch.Tensor:
        """The loop: clean forward once, then one full forward per (direction, length)."""
        logits, store, _ = subject.forward(ids, capture=[last])
        assert logits is not None
        clean_logp = torch.log_softmax(logits.float(), -1)[:, positions]
        clean_last = store[last][:, positions].float()
        out = []
        for d, length in pairs:
            delta = (length * dirs[d]).to(subject.dtype)

            def edit(x: torch.Tensor, delta: torch.Tensor = delta) -> torch.Tensor:
                y = x.clone()
                y[:, positions] += delta
                return y

            pert, got, _ = subject.forward(ids, edits={site: edit}, capture=[last])
            assert pert is not None
            out.append(kl_per_token(clean_logp, pert[:, positions].float()))
            _ = (got[last][:, positions].float() - clean_last).norm(dim=-1)  # the L2 readout
        return torch.stack(out)

    def fast_last() -> torch.Tensor:
        runner = LastPositionRunner(subject, ids, site)
        delta = torch.cat([(length * dirs[d]).expand(n, -1) for d, length in pairs])
        return runner.evaluate(delta, torch.arange(n).repeat(len(pairs)))[0]

    def fast_all(batch_tokens: int) -> torch.Tensor:
        runner = AllPositionsRunner(subject, ids, site, batch_tokens=batch_tokens)
        clean = runner.clean_site
        kls = []
        step = max(1, batch_tokens // (n * t))
        for lo in range(0, len(pairs), step):
            chunk = pairs[lo:lo + step]
            x = clean.unsqueeze(0).repeat(len(chunk), 1, 1, 1)
            for i, (d, length) in enumerate(chunk):
                x[i, :, 1:] += length * dirs[d]
            kl, _ = runner.evaluate(x.reshape(-1, t, subject.d_model),
                                    torch.arange(n).repeat(len(chunk)))
            kls.append(kl[:, 1:].reshape(len(chunk), n, t - 1))
        return torch.cat(kls)

    sides = {"baseline": lambda: naive(slice(-1, None)), "steerscope": fast_last}
    if all_positions:
        sides |= {"baseline_all": lambda: naive(slice(1, None)),
                  "steerscope_all": lambda: fast_all(DEFAULT_BATCH_TOKENS),
                  "steerscope_all_unbatched": lambda: fast_all(n * t)}
    wall = {k: math.inf for k in sides}
    cpu = {k: math.inf for k in sides}
    kl: dict[str, torch.Tensor] = {}
    for _ in range(repeats):  # alternate the sides; keep each side's fastest run
        for name, fn in sides.items():
            w0, c0 = time.perf_counter(), time.process_time()
            kl[name] = fn().reshape(len(pairs), n, -1)
            wall[name] = min(wall[name], time.perf_counter() - w0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    diff = (kl["steerscope"] - kl["baseline"]).abs()
    result: dict[str, Any] = {
        "name": "sensitivity",
        "baseline_s": wall["baseline"],
        "steerscope_s": wall["steerscope"],
        "ratio": wall["baseline"] / wall["steerscope"],
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / kl["baseline"].abs().clamp_min(1e-6)).max()),
        "features_per_s": len(pairs) / wall["steerscope"],
        "baseline_features_per_s": len(pairs) / wall["baseline"],
        "baseline_cpu_s": cpu["baseline"], "steerscope_cpu_s": cpu["steerscope"],
        "ratio_cpu": cpu["baseline"] / cpu["steerscope"],
        "model": subject.name, "site": site, "n_contexts": n, "context_length": t,
        "n_directions": n_directions, "lengths_rel": list(lengths),
        "evaluations": len(pairs) * n, "repeats": repeats,
    }
    if all_positions:
        diff_all = max(float((kl[k] - kl["baseline_all"]).abs().max())
                       for k in ("steerscope_all", "steerscope_all_unbatched"))
        result.update({
            "baseline_all_positions_s": wall["baseline_all"],
            "steerscope_all_positions_s": wall["steerscope_all"],
            "ratio_all_positions": wall["baseline_all"] / wall["steerscope_all"],
            "max_abs_diff_all_positions": diff_all,
            "ceiling_all_positions": layer_ceiling(subject, site),
            "steerscope_all_positions_unbatched_s": wall["steerscope_all_unbatched"],
            "ratio_all_positions_skip_only": (wall["baseline_all"]
                                              / wall["steerscope_all_unbatched"]),
            "ratio_all_positions_cpu": cpu["baseline_all"] / cpu["steerscope_all"],
        })
    return result
