"""Steered text generation: KV cache, per-row interventions, batched, seeded.

Why our own decoding loop instead of ``model.generate``: the open-ended steering evaluation
(Arad et al., docs/methods.md §1.5) generates for thousands of (feature, strength, prefix) rows,
and every row steers a *different* feature at a *different* strength. ``generate`` installs one
hook for the whole batch, so it would force one batch per feature. Here each row carries its own
intervention, the hook applies all of them in one vectorised step, and the rest is a plain
KV-cache decoding loop:

* **Left padding** with an explicit attention mask and position ids (``cumsum(mask) - 1``), so a
  padded row sees exactly the positions and keys it would see alone. Batched generation equals
  unbatched generation (tested), which is what makes batching over rows safe at all.
* **Per-row seeds**: every row draws its samples from its own ``torch.Generator``, so a row's
  text does not depend on which other rows share its batch, nor on the batch order.
* **Position policies**, applied by absolute position in the padded sequence: ``last`` steers the
  prompt's last token and then every generated token (with a KV cache each decoding step sees one
  new token, so this is Arad's "last position at every step"); ``all`` steers every prompt token
  too; an integer ``p`` steers from prompt position ``p`` on. The no-cache path
  (``use_cache=False``, the reference the cache is tested against) re-runs the whole sequence at
  every step and steers exactly the same absolute positions, so both paths agree token for token.
* **Finished rows leave the batch** (stop string, EOS): their cache rows are dropped, so a batch
  with Arad's ``stop_strings="."`` does not keep paying for rows that are done.

Any intervention of :mod:`steerscope.interventions` works: those whose effect at a position is a
constant vector or a function of that position's activation alone are applied in one vectorised
call for the whole batch; anything else falls back to the operator's own ``edit(sae)`` function
applied row by row, which is exact for every position-wise operator.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerscope.errors import SteerscopeError
from steerscope.subject import Edit, Subject

RowEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``edit(x [n, d], rows [n]) -> x'``: a position-wise edit of ``n`` activations, where ``rows``
says which request each activation belongs to (so every row can steer differently)."""

NEVER = 1 << 40  # "steer from this position on" for rows that are not steered


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn. ``temperature=0`` is greedy decoding.

    ``stop`` lists stop strings: a row ends with the token whose text completes one of them
    (that token is kept, as in HF's ``stop_strings``). ``stop_at_eos`` ends a row at the EOS token,
    which is not kept. ``seed`` seeds every row whose request gives no seed of its own.
    """

    max_new_tokens: int = 40
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise SteerscopeError(
                f"max_new_tokens={self.max_new_tokens} is negative", "use 0 or more"
            )
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise SteerscopeError(
                f"temperature {self.temperature} is invalid", "use 0 (greedy) or a positive number"
            )
        if self.top_k is not None and self.top_k < 1:
            raise SteerscopeError(f"top_k={self.top_k} is invalid", "use an integer ≥ 1 or none")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SteerscopeError(f"top_p={self.top_p} is invalid", "use a number in (0, 1]")


DEFAULT_SAMPLING = Sampling()
ARAD_SAMPLING = Sampling(max_new_tokens=20, temperature=0.7, stop=(".",))
"""Arad et al.'s open-ended protocol: up to 20 new tokens, T=0.7, stop at the first '.'."""


@dataclass(frozen=True)
class Request:
    """One row to generate: a prompt (text, or token ids including BOS), an optional
    intervention from :mod:`steerscope.interventions`, and an optional per-row seed."""

    prompt: str | tuple[int, ...]
    op: Any = None
    seed: int | None = None


@dataclass
class Generation:
    """A finished row. ``tokens`` are the generated ids only (prompt stripped, EOS dropped)."""

    prompt_ids: list[int]
    tokens: list[int]
    text: str
    finish: str  # "stop" | "eos" | "length"


@dataclass
class _Row:
    ids: list[int]
    op: Any
    seed: int


# --------------------------------------------------------------------------- per-row edits
def position_policy(op: Any) -> str | int:
    """The position policy of an operator: ``"last"``, ``"all"`` or a start position ``p``.

    Operators without a ``positions`` attribute steer all positions (the SAELens/Neuronpedia
    default). An integer ``p`` is a prompt position (negative: counted from the prompt's end);
    every generated token is steered under every policy.
    """
    pol = getattr(op, "positions", "all")
    start = getattr(op, "start", None)
    if pol == "from" and start is not None:
        return int(start)
    if isinstance(pol, bool):
        raise SteerscopeError(f"unknown position policy {pol!r}", "use last, all or from:p")
    if isinstance(pol, int):
        return pol
    if isinstance(pol, tuple) and len(pol) == 2 and pol[0] == "from":
        return int(pol[1])
    if isinstance(pol, str):
        if pol in ("last", "all"):
            return pol
        if pol.lstrip("-").isdigit():
            return int(pol)
        text = pol.replace(" ", ":").replace("=", ":")
        if text.startswith("from:") and text[5:].lstrip("-").isdigit():
            return int(text[5:])
    raise SteerscopeError(f"unknown position policy {pol!r}", "use last, all or from:p")


def _as_all_positions(op: Any) -> Any:
    """The same operator with its position policy set to ``all`` (generation decides where)."""
    if dataclasses.is_dataclass(op) and any(f.name == "positions" for f in dataclasses.fields(op)):
        try:
            return dataclasses.replace(op, positions="all")
        except (TypeError, ValueError):
            return op
    return op


def _group_key(op: Any) -> tuple:
    """How an operator is batched: a constant vector, Arad's position-max, a clamp, the class's
    own ``batch_edit``, or the operator's ``edit`` row by row."""
    name = type(op).__name__
    if name == "AdditiveSteer" and hasattr(op, "vector"):
        if getattr(op, "scale", "absolute") == "position_max":
            return ("position_max", bool(getattr(op, "unit", False)))
        return ("constant",)
    if name == "ClampLatent" and hasattr(op, "value"):
        return ("clamp",)
    if getattr(op, "depends_on_input", None) is False and hasattr(op, "vector"):
        return ("constant",)
    if callable(getattr(type(op), "batch_edit", None)):
        return ("batch", type(op))
    return ("each", type(op))


def _group_edit(key: tuple, ops: list[Any], sae: Any) -> RowEdit:
    """A row edit over the members of one group (rows index ``ops``)."""
    kind = key[0]
    if kind == "constant":
        table = torch.stack([op.vector(sae).detach() for op in ops])

        def add(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            t = table if table.device == x.device and table.dtype == x.dtype else table.to(
                device=x.device, dtype=x.dtype
            )
            return x + t[rows.to(x.device)]

        add.table = table  # type: ignore[attr-defined]  # lets the hook precompute the deltas
        return add
    if kind == "position_max":
        from steerscope.interventions import position_max_edit

        return position_max_edit(
            sae, [op.feature for op in ops], [float(op.strength) for op in ops], unit=key[1]
        )
    if kind == "clamp":
        from steerscope.interventions import clamp_edit

        return clamp_edit(sae, [op.feature for op in ops], [float(op.value) for op in ops])
    if kind == "batch":
        return key[1].batch_edit(ops, sae)
    edits = [_as_all_positions(op).edit(sae) for op in ops]

    def each(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        r = rows.cpu()
        for i in r.unique().tolist():
            sel = (r == i).nonzero().squeeze(1).to(x.device)
            out[sel] = edits[i](x[sel].unsqueeze(1)).squeeze(1)
        return out

    return each


def row_edit(ops: Sequence[Any], sae: Any) -> RowEdit | None:
    """One vectorised position-wise edit for a batch whose row ``i`` applies ``ops[i]``.

    Rows with ``None`` are untouched. Operators are grouped by how they batch: constant vectors
    (absolute / ×max-activation additive steering) become one gather-add, Arad's ×largest-latent
    convention one SAE encode for the whole batch (:func:`interventions.position_max_edit`),
    clamps one encode/decode (:func:`interventions.clamp_edit`); a class may provide its own
    ``batch_edit(ops, sae) -> RowEdit``; anything else applies its own ``edit(sae)`` to each
    row's positions as length-1 sequences, which is exact for any position-wise operator.
    """
    n = len(ops)
    idx = [i for i, op in enumerate(ops) if op is not None]
    if not idx:
        return None
    groups: dict[tuple, list[int]] = {}
    for i in idx:
        groups.setdefault(_group_key(ops[i]), []).append(i)
    parts: list[tuple[torch.Tensor, torch.Tensor, RowEdit]] = []
    for key, members in groups.items():
        member = torch.zeros(n, dtype=torch.bool)
        member[members] = True
        local = torch.full((n,), -1, dtype=torch.long)
        local[members] = torch.arange(len(members))
        parts.append((member, local, _group_edit(key, [ops[i] for i in members], sae)))

    constant = None  # [n, d]: every row's added vector, when every operator adds a constant
    if all(hasattr(fn, "table") for _, _, fn in parts):
        first = parts[0][2].table  # type: ignore[attr-defined]
        constant = first.new_zeros(n, first.shape[-1])
        for member, local, fn in parts:
            constant[member] = fn.table[local[member]]  # type: ignore[attr-defined]

    if len(parts) == 1 and len(idx) == n:
        _, local, fn = parts[0]

        def single(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return fn(x, local[rows.cpu()])

        single.constant = constant  # type: ignore[attr-defined]
        return single

    def apply(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = x
        r = rows.cpu()
        for member, local, fn in parts:
            sel = member[r]
            if not bool(sel.any()):
                continue
            where = sel.nonzero().squeeze(1)
            out = out.clone() if out is x else out
            dev_where = where.to(x.device)
            out[dev_where] = fn(out[dev_where], local[r[where]])
        return out

    apply.constant = constant  # type: ignore[attr-defined]
    return apply


# --------------------------------------------------------------------------- the hook
@dataclass
class _HookState:
    """What the steering hook needs to know about the forward it is called in."""

    steer_from: torch.Tensor  # [B_all] first padded position steered per original row
    alive: torch.Tensor  # [B] original row index of each row in the current batch
    start: int = 0  # padded position of the first token of the current forward
    delta: torch.Tensor | None = None  # [B, 1, d] cached per-row vector for the decoding steps

    def set_alive(self, alive: torch.Tensor) -> None:
        self.alive = alive
        self.delta = None


def _make_hook(state: _HookState, edit: RowEdit) -> Edit:
    constant = getattr(edit, "constant", None)
    steered = state.steer_from < NEVER
    last_start = int(state.steer_from[steered].max()) if bool(steered.any()) else 0

    def hook(x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if constant is not None and t == 1 and state.start >= last_start:
            # Decoding step of additive operators: every steered row adds its own constant
            # vector (zero for unsteered rows, an exact no-op), gathered once per batch layout.
            if state.delta is None or state.delta.dtype != x.dtype:
                state.delta = constant[state.alive].to(device=x.device, dtype=x.dtype)[:, None]
            return x + state.delta
        pos = torch.arange(state.start, state.start + t)
        steer = pos[None, :] >= state.steer_from[state.alive][:, None]  # [B, t]
        if not bool(steer.any()):
            return x
        rows = state.alive[:, None].expand(b, t)
        if bool(steer.all()):
            out = edit(x.reshape(b * t, d), rows.reshape(-1))
            return out.reshape(b, t, d)
        where = steer.reshape(-1).nonzero().squeeze(1)
        flat = x.reshape(b * t, d).clone()
        dev_where = where.to(x.device)
        flat[dev_where] = edit(flat[dev_where], rows.reshape(-1)[where])
        return flat.reshape(b, t, d)

    return hook


# --------------------------------------------------------------------------- sampling
def _filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), HF's order and conventions."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        srt, order = torch.sort(logits, dim=-1, descending=False)
        cum = srt.softmax(-1).cumsum(-1)
        remove_sorted = cum <= 1 - sampling.top_p
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _sample(
    logits: torch.Tensor, sampling: Sampling, gens: list[torch.Generator]
) -> torch.Tensor:
    """Next token per row. Each row uses one uniform draw from its own generator (inverse CDF),
    so its choice never depends on the other rows of the batch."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    cdf = _filter_logits(logits, sampling).softmax(-1).cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g) for g in gens])
    u = u.to(cdf.device) * cdf[:, -1]
    nxt = torch.searchsorted(cdf, u[:, None]).squeeze(1)
    return nxt.clamp_max(logits.shape[-1] - 1)


# --------------------------------------------------------------------------- model calls
_LOGITS_TO_KEEP: dict[type, bool] = {}


def _model_forward(
    subject: Subject,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    past: Any,
    use_cache: bool,
    last_only: bool = True,
) -> tuple[torch.Tensor, Any]:
    model = subject.model
    cls = type(model)
    if cls not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {}
    if last_only and _LOGITS_TO_KEEP[cls]:
        kwargs["logits_to_keep"] = 1
    dev = subject.device
    out = model(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
        past_key_values=past, use_cache=use_cache, **kwargs,
    )
    return out.logits, getattr(out, "past_key_values", None)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded mask: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _select_cache(past: Any, keep: torch.Tensor) -> Any:
    """Drop finished rows from the KV cache (in place where the cache supports it)."""
    if past is None:
        return None
    if hasattr(past, "batch_select_indices"):
        past.batch_select_indices(keep.to(_cache_device(past)))
        return past
    if isinstance(past, tuple):
        return tuple(tuple(t[keep.to(t.device)] for t in layer) for layer in past)
    raise SteerscopeError(
        f"cannot drop finished rows from a {type(past).__name__}",
        "use a model with a standard (dynamic) KV cache",
    )


def _cache_device(past: Any) -> torch.device:
    for layer in getattr(past, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor):
            return keys.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- public API
def encode_prompts(subject: Subject, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids of each prompt (the tokenizer's own BOS handling); id lists pass through."""
    out: list[list[int]] = []
    tok = subject.tokenizer
    for p in prompts:
        if isinstance(p, str):
            if tok is None:
                raise SteerscopeError(
                    "the model has no tokenizer", "load a model directory with one"
                )
            ids = list(tok(p)["input_ids"])
        else:
            ids = [int(i) for i in p]
        if not ids:
            raise SteerscopeError(f"prompt {p!r} has no tokens", "use a non-empty prompt")
        if max(ids) >= subject.vocab_size or min(ids) < 0:
            raise SteerscopeError(
                f"prompt {p!r} has a token id outside the vocabulary ({subject.vocab_size})",
                "tokenize with the model's own tokenizer",
            )
        out.append(ids)
    return out


def generate_requests(
    subject: Subject,
    requests: Sequence[Request],
    sampling: Sampling = DEFAULT_SAMPLING,
    sae: Any = None,
    *,
    site: str | None = None,
    batch_size: int = 256,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Generate every request, steering row ``i`` with ``requests[i].op`` at ``site``.

    ``site`` defaults to the SAE's hook. Rows are grouped by prompt length (less padding) and
    run ``batch_size`` at a time; results come back in request order and do not depend on the
    grouping. ``use_cache=False`` re-runs the full sequence at every step (slow; the reference).
    """
    if not requests:
        raise SteerscopeError("no prompt given", "pass at least one prompt")
    sampling.check()
    if batch_size < 1:
        raise SteerscopeError(f"batch size {batch_size} is invalid", "use 1 or more")
    steered = any(r.op is not None for r in requests)
    if steered:
        if sae is None:
            raise SteerscopeError("an intervention needs an SAE", "pass sae=load_sae(...)")
        site = site or sae.hook
        subject.site(site)
    ids = encode_prompts(subject, [r.prompt for r in requests])
    rows = [
        _Row(i, r.op, sampling.seed if r.seed is None else int(r.seed))
        for i, r in zip(ids, requests, strict=True)
    ]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    results: list[Generation | None] = [None] * len(rows)
    done = 0
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        outs = _generate_batch(subject, [rows[i] for i in chunk], sampling, sae, site, use_cache)
        for i, g in zip(chunk, outs, strict=True):
            results[i] = g
        done += len(chunk)
        if progress is not None:
            progress(done, len(rows))
    return [g for g in results if g is not None]


def _generate_batch(
    subject: Subject,
    rows: list[_Row],
    sampling: Sampling,
    sae: Any,
    site: str | None,
    use_cache: bool,
) -> list[Generation]:
    tok = subject.tokenizer
    b = len(rows)
    width = max(len(r.ids) for r in rows)
    pad_id = 0
    if tok is not None and tok.pad_token_id is not None:
        pad_id = int(tok.pad_token_id)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    steer_from = torch.full((b,), NEVER, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, width - n:] = torch.tensor(r.ids)
        mask[i, width - n:] = 1
        if r.op is not None:
            pol = position_policy(r.op)
            if pol == "last":
                steer_from[i] = width - 1
            elif pol == "all":
                steer_from[i] = width - n
            elif int(pol) < 0:  # the last |p| prompt positions, then every new token
                steer_from[i] = max(width - n, width + int(pol))
            else:
                steer_from[i] = width - n + int(pol)
    edit = row_edit([r.op for r in rows], sae) if site is not None else None
    state = _HookState(steer_from=steer_from, alive=torch.arange(b))
    edits = {site: _make_hook(state, edit)} if edit is not None and site is not None else {}
    gens = [torch.Generator().manual_seed(r.seed) for r in rows]
    new: list[list[int]] = [[] for _ in rows]
    finish = ["length"] * b
    eos = None if tok is None else tok.eos_token_id
    eos_ids = set()
    if sampling.stop_at_eos:
        cfg_eos = getattr(subject.model.config, "eos_token_id", None)
        for e in (eos, cfg_eos):
            if isinstance(e, int):
                eos_ids.add(e)
            elif isinstance(e, (list, tuple)):
                eos_ids.update(int(x) for x in e)
    if sampling.stop and tok is None:
        raise SteerscopeError("stop strings need a tokenizer", "load a model directory with one")
    checked = [0] * b  # characters of each row's text already searched for stop strings
    max_stop = max((len(s) for s in sampling.stop), default=0)

    alive = torch.arange(b)
    seq = ids  # full padded sequences (for the no-cache path)
    cur_mask = mask
    past = None
    with torch.no_grad(), subject.hooks(edits):
        state.start = 0
        logits, past = _model_forward(
            subject, ids, mask, _positions(mask), None, use_cache=use_cache
        )
        for step in range(sampling.max_new_tokens):
            nxt = _sample(logits[:, -1], sampling, [gens[i] for i in alive.tolist()]).cpu()
            finished = torch.zeros(len(alive), dtype=torch.bool)
            for j, (row, t) in enumerate(zip(alive.tolist(), nxt.tolist(), strict=True)):
                if t in eos_ids:
                    finish[row] = "eos"
                    finished[j] = True
                else:
                    new[row].append(t)
            if sampling.stop:
                live = [(j, row) for j, row in enumerate(alive.tolist()) if not finished[j]]
                texts = tok.batch_decode([new[row] for _, row in live], skip_special_tokens=True)
                for (j, row), text in zip(live, texts, strict=True):
                    lo = max(0, checked[row] - max_stop + 1)
                    if any(s in text[lo:] for s in sampling.stop):
                        finish[row] = "stop"
                        finished[j] = True
                    checked[row] = len(text)
            if step == sampling.max_new_tokens - 1 or bool(finished.all()):
                break
            keep = (~finished).nonzero().squeeze(1)
            if bool(finished.any()):
                alive = alive[keep]
                nxt = nxt[keep]
                cur_mask = cur_mask[keep]
                seq = seq[keep]
                if use_cache:
                    past = _select_cache(past, keep)
            if alive is not state.alive:
                state.set_alive(alive)
            cur_mask = torch.cat([cur_mask, torch.ones(len(alive), 1, dtype=torch.long)], 1)
            if use_cache:
                state.start = width + step
                pos = _positions(cur_mask)[:, -1:]
                logits, past = _model_forward(
                    subject, nxt[:, None], cur_mask, pos, past, use_cache=True
                )
            else:
                seq = torch.cat([seq, nxt[:, None]], 1)
                state.start = 0
                logits, _ = _model_forward(
                    subject, seq, cur_mask, _positions(cur_mask), None, use_cache=False
                )
    texts = (
        tok.batch_decode(new, skip_special_tokens=True) if tok is not None else [""] * b
    )
    return [
        Generation(prompt_ids=list(r.ids), tokens=new[i], text=texts[i], finish=finish[i])
        for i, r in enumerate(rows)
    ]


def generate(
    subject: Subject,
    prompts: Sequence[str],
    sampling: Sampling = DEFAULT_SAMPLING,
    edits: dict[str, Edit] | None = None,
    *,
    op: Any = None,
    sae: Any = None,
    site: str | None = None,
    batch_size: int = 256,
) -> list[str]:
    """Continuations (prompt stripped) of ``prompts``.

    Either ``op`` (an intervention of :mod:`steerscope.interventions`, applied to every row with
    ``sae``) or ``edits`` (raw ``{site: edit}`` functions, which see whatever the hook sees: the
    whole padded prompt at prefill, one token per decoding step) — ``edits`` run one prompt at a
    time, because a raw edit cannot know which positions are padding.
    """
    if not prompts:
        raise SteerscopeError("no prompt given", "pass at least one prompt")
    if edits:
        if op is not None:
            raise SteerscopeError("pass either op or edits, not both", "use op= for interventions")
        out: list[str] = []
        for p in prompts:
            with subject.hooks(edits):
                out.extend(g.text for g in generate_requests(subject, [Request(p)], sampling))
        return out
    reqs = [Request(p, op) for p in prompts]
    gens = generate_requests(subject, reqs, sampling, sae, site=site, batch_size=batch_size)
    return [g.text for g in gens]

