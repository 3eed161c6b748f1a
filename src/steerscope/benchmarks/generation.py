"""Benchmark of steered generation: per-token time steered vs unsteered, both with the KV cache.

Steering must not make generation noticeably slower, or nobody steers thousands of
(feature, strength, prefix) rows. Both arms run the same decoding loop of
:mod:`steerscope.generation` on the same prompts, the same number of new tokens (no stop strings,
no EOS stop, so the work is identical), the same seeds; the steered arm gives every row its own
feature (the per-row intervention machinery is what is being measured). Target:
``ratio = steerscope_s / baseline_s ≤ 1.10``.

* ``ratio`` — additive steering (raw decoder row, last position + every new token): the
  overhead of the generation machinery itself.
* ``ratio_position_max`` — Arad's ×largest-latent convention, which must run the SAE encoder on
  every steered token; that encode is work the method needs, so it is reported, not targeted.
* ``hf_generate_s`` — HF ``model.generate`` on the same batch, unsteered and greedy: a check that
  our loop is not slower than the library's.

Arms are interleaved (in alternating order) and each timed ``repeats`` times; the median is
reported (the machine is shared, so single timings are noisy).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def bench_generation(
    model: str | None = None,
    sae: str = "relu-blocks.0.hook_resid_post",
    *,
    n_prompts: int = 64,
    new_tokens: int = 32,
    repeats: int = 15,
    strength: float = 4.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Time both arms on the embedded model and SAE (or the given ones)."""
    from steerscope.assets import resolve_model, resolve_sae
    from steerscope.errors import SteerscopeError
    from steerscope.filtering import load_prefixes
    from steerscope.generation import Request, Sampling, generate_requests
    from steerscope.interventions import AdditiveSteer
    from steerscope.saes import load_sae
    from steerscope.subject import Subject

    if n_prompts < 1 or new_tokens < 1 or repeats < 1:
        raise SteerscopeError("prompts, new tokens and repeats must be ≥ 1", "use positive values")
    subject = Subject.load(resolve_model(model))
    src, sae_id = resolve_sae(sae)
    lens = load_sae(src, sae_id)
    lens.check(subject)
    base = load_prefixes("tinystories")
    prompts = [base[i % len(base)] for i in range(n_prompts)]
    feats = torch.randperm(lens.d_sae, generator=torch.Generator().manual_seed(seed))[:n_prompts]
    feats = [int(feats[i % len(feats)]) for i in range(n_prompts)]
    sampling = Sampling(max_new_tokens=new_tokens, temperature=0.7, seed=seed, stop_at_eos=False)
    arms = {
        "unsteered": [Request(p, None, seed=seed + i) for i, p in enumerate(prompts)],
        "additive": [Request(p, AdditiveSteer(f, strength, positions="last"), seed=seed + i)
                     for i, (p, f) in enumerate(zip(prompts, feats, strict=True))],
        "position_max": [
            Request(p, AdditiveSteer(f, 1.2, positions="last", scale="position_max"),
                    seed=seed + i)
            for i, (p, f) in enumerate(zip(prompts, feats, strict=True))
        ],
    }
    tok = subject.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)

    def run_hf() -> None:
        with torch.no_grad():
            subject.model.generate(
                **enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            )

    times: dict[str, list[float]] = {k: [] for k in [*arms, "hf_generate"]}
    n_tokens = {}
    for name, reqs in arms.items():  # warm-up (and token counts)
        gens = generate_requests(subject, reqs, sampling, lens, batch_size=n_prompts)
        n_tokens[name] = sum(len(g.tokens) for g in gens)
    run_hf()
    for rep in range(repeats):
        order = list(arms.items())
        for name, reqs in order if rep % 2 == 0 else order[::-1]:  # no systematic position
            t0 = time.perf_counter()
            generate_requests(subject, reqs, sampling, lens, batch_size=n_prompts)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_hf()
        times["hf_generate"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = n_prompts * new_tokens
    return {
        "name": "generation",
        "baseline_s": med["unsteered"],
        "steerscope_s": med["additive"],
        "ratio": med["additive"] / med["unsteered"],
        "baseline_per_token_s": med["unsteered"] / total,
        "steerscope_per_token_s": med["additive"] / total,
        "position_max_s": med["position_max"],
        "position_max_per_token_s": med["position_max"] / total,
        "ratio_position_max": med["position_max"] / med["unsteered"],
        "hf_generate_s": med["hf_generate"],
        "hf_generate_per_token_s": med["hf_generate"] / total,
        "tokens_per_arm": n_tokens,
        "n_prompts": n_prompts, "new_tokens": new_tokens, "repeats": repeats,
        "all_times_s": times,
        "sae": lens.name, "model": subject.name, "threads": torch.get_num_threads(),
    }
