"""The batched intervention engine: many last-position interventions over one cached clean prefix.

Almost every method here steers ONE position (the last) of a fixed context. Positions before it
do not see the edit (causal attention), so their keys and values in every layer are exactly the
clean ones. :class:`CleanPrefix` therefore runs the clean prefixes ``ids[:, :-1]`` once with a KV
cache and answers each intervention by replaying only the last token over the cached rows of its
context: one token of compute instead of ``T``, for any number of (feature, context, strength)
triples. The result equals a full re-forward with the same edit at the last position (tested for
every architecture family of :mod:`steerscope.subject`).

How the replay is built: the prefix forward returns the model's own ``DynamicCache`` (transformers
5), whose per-layer objects already encode the family's attention pattern — sliding-window layers
(Mistral, Qwen2, Gemma-2 local layers) keep the last ``window - 1`` keys and their cumulative
length, so the mask of the replayed token is the model's own. The stored keys/values get one free
slot at the end; for a chunk of triples we shallow-copy the cache, ``index_select`` the rows of
``ctx`` into reused buffers, and let each layer write the new token into the free slot (one copy
of the prefix per triple instead of the two that ``DynamicLayer.update``'s concatenation costs).
GPT-Neo's local attention masks with a fixed band over the full key length, which a full cache
also reproduces. A model whose cache is not a plain per-layer key/value cache (an encoder-decoder
cache, a recurrent state) falls back to a full forward per chunk, which is exact but not fast
(``fast`` is False).

Two more savings, both exact and both tested against the full forward:

* blocks before the intervention see only the clean last token, so for the families in
  ``_SKIP_FAMILIES`` the replay starts at the first block the edit can affect, fed with the clean
  ``resid_pre`` of that block (cached once per site); the skipped blocks are neither run nor
  gathered. Steering at ``blocks.L.hook_resid_post`` of an N-block model costs N − L − 1 blocks.
* with one query per row, PyTorch's CPU SDPA kernel is dominated by per-row setup; Llama-like
  ``sdpa`` models use two batched matmuls instead (``_single_query_attention``).

Chunk sizes come from a memory budget (``memory_mb``): the gathered cache rows, the new
activations and the logits of one triple are estimated in bytes for the model's dtype, and a chunk
holds as many triples as fit (on CPU also capped so that no tensor outgrows
:data:`CPU_TENSOR_BYTES`). Results stay on the model's device, in the model's dtype.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from steerscope.errors import SteerscopeError
from steerscope.subject import Subject

LastEdit = Callable[[torch.Tensor], torch.Tensor]
"""``edit(x_last [k, d]) -> x_last``: the same edit for every row of a chunk."""

RowEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``edit(x_last [k, d], rows [k]) -> x_last``: ``rows`` index the triples of the call, so an edit
can differ per triple (a per-row feature to clamp, say)."""

DEFAULT_MEMORY_MB = 512.0
CPU_TENSOR_BYTES = 16 * 2**20
"""On CPU, no per-chunk tensor (the logits above all) grows beyond this: see ``chunk_size``."""


@dataclass
class CleanPrefix:
    """Clean contexts run once with a KV cache; each intervention replays only the last token."""

    subject: Subject
    ids: torch.Tensor  # [n, T] on CPU
    capture_sites: tuple[str, ...]
    clean_logits: torch.Tensor  # [n, vocab] last position
    clean_acts: dict[str, torch.Tensor]  # site -> [n, d] last position
    memory_mb: float = DEFAULT_MEMORY_MB
    fast: bool = True
    _cache: Any = field(default=None, repr=False)
    # Gather targets reused across chunks: a fresh multi-MB tensor per chunk costs more in page
    # faults than the copy itself (measured: 90 ms vs 13 ms for 3072 rows of the 656K model).
    _buffers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _clean_extra: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        subject: Subject,
        ids: torch.LongTensor,
        capture: Sequence[str] = (),
        batch_size: int | None = None,
        *,
        memory_mb: float = DEFAULT_MEMORY_MB,
        fast: bool = True,
    ) -> CleanPrefix:
        """Run the prefixes ``ids[:, :-1]`` once (in batches) and the clean last token once.

        ``capture`` names the sites whose clean last-position activations are kept in
        ``clean_acts`` (:meth:`replay` can capture any site). ``batch_size`` bounds the prefix
        batches; by default it follows ``memory_mb``. ``fast=False`` forces the full-forward
        path (the reference the fast path is tested against).
        """
        ids = _check_ids(ids)
        for s in capture:
            subject.site(s)
        if memory_mb <= 0 or not torch.isfinite(torch.tensor(float(memory_mb))):
            raise SteerscopeError(f"memory budget {memory_mb} MB is not positive", "use e.g. 512")
        self = cls(
            subject=subject, ids=ids, capture_sites=tuple(dict.fromkeys(capture)),
            clean_logits=torch.empty(0), clean_acts={}, memory_mb=float(memory_mb), fast=fast,
        )
        if fast:
            self._cache = self._prefix_cache(batch_size)
            self.fast = self._cache is not None
        logits, acts = self._run(torch.arange(self.n), None, None, None, self.capture_sites)
        self.clean_logits, self.clean_acts = logits, acts
        return self

    def _prefix_cache(self, batch_size: int | None) -> Any:
        """The per-layer K/V of every prefix, concatenated over batches (None: no fast path).

        Each layer's keys/values get one empty slot at the end, where the replayed token's K/V
        is written: gathering rows then copies the prefix once, where the cache's own
        ``update`` would concatenate (copy) it a second time.
        """
        n, t = self.ids.shape
        # Prefix activations cost about 24 d_model floats per token; the cache is kept anyway.
        per_ctx = max(1, (t - 1) * self.subject.d_model * 24 * _itemsize(self.subject.dtype))
        bs = batch_size or max(1, int(self.memory_mb * 2**20 // per_ctx))
        parts: list[Any] = []
        for start in range(0, n, bs):
            pkv = _prefix_forward(self.subject, self.ids[start:start + bs, :-1])
            if not _is_plain_kv_cache(pkv):
                return None
            parts.append(pkv)
        cache = copy.copy(parts[0])
        cache.layers = []
        for i, layer in enumerate(parts[0].layers):
            new = copy.copy(layer)
            new.keys = _with_slot([p.layers[i].keys for p in parts])
            new.values = _with_slot([p.layers[i].values for p in parts])
            cache.layers.append(new)
        return cache

    # ------------------------------------------------------------------ replay
    def replay(
        self,
        ctx: torch.LongTensor,
        site: str | None = None,
        delta: torch.Tensor | None = None,
        *,
        edit: LastEdit | None = None,
        row_edit: RowEdit | None = None,
        capture: Sequence[str] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Last-position logits ``[m, vocab]`` and captures ``{site: [m, d]}`` of m interventions.

        Triple ``i`` runs context ``ctx[i]`` with ``delta[i]`` added at ``site`` on its last
        position (then ``edit`` / ``row_edit``, if given, is applied to the last position there).
        Without ``site`` it is a clean replay. Chunks of ``m`` follow the memory budget.
        """
        ctx = torch.as_tensor(ctx, dtype=torch.long).reshape(-1).cpu()
        if ctx.numel() and (int(ctx.min()) < 0 or int(ctx.max()) >= self.n):
            raise SteerscopeError(
                f"context index out of range (have {self.n} contexts)",
                f"use context indices from 0 to {self.n - 1}",
            )
        if site is None and (delta is not None or edit is not None or row_edit is not None):
            raise SteerscopeError("an intervention needs a site", "pass site='blocks.L.hook_...'")
        if site is not None:
            self.subject.site(site)
        if delta is not None:
            if delta.shape != (ctx.numel(), self.subject.d_model):
                raise SteerscopeError(
                    f"delta has shape {tuple(delta.shape)}, expected "
                    f"({ctx.numel()}, {self.subject.d_model})",
                    "give one steering vector per context",
                )
            if not bool(torch.isfinite(delta).all()):
                raise SteerscopeError("steering delta is not finite", "use finite strengths")
        for s in capture:
            self.subject.site(s)
        return self._run(ctx, site, delta, (edit, row_edit), tuple(dict.fromkeys(capture)))

    def chunk_size(self, n_capture: int = 0) -> int:
        """Triples per replay chunk under the memory budget."""
        item = _itemsize(self.subject.dtype)
        d, v = self.subject.d_model, self.subject.vocab_size
        per_row = (24 * d + 3 * v + n_capture * d) * item
        if self.fast and self._cache is not None:
            kv = sum(
                layer.keys[:1].numel() + layer.values[:1].numel()
                for layer in self._cache.layers if layer.keys is not None
            )
            per_row += kv * item  # the gathered rows (with the new token's slot)
        else:
            per_row *= self.length
        rows = int(self.memory_mb * 2**20 // per_row)
        if self.subject.device.type == "cpu":
            # glibc serves blocks above 32 MB with fresh mmaps, so every such tensor pays its
            # page faults again (a [3072, 2048] float64 logits tensor: 3× slower ops).
            rows = min(rows, CPU_TENSOR_BYTES // (max(v, d) * item))
        return max(1, rows)

    def _run(
        self,
        ctx: torch.Tensor,
        site: str | None,
        delta: torch.Tensor | None,
        edits: tuple[LastEdit | None, RowEdit | None] | None,
        capture: tuple[str, ...],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        subject = self.subject
        dev, dt = subject.device, subject.dtype
        m = int(ctx.numel())
        logits_parts: list[torch.Tensor] = []
        acts_parts: dict[str, list[torch.Tensor]] = {s: [] for s in capture}
        edit, row_edit = edits if edits is not None else (None, None)
        plan = self._skip_plan(site, capture) if self.fast and self._cache is not None else None
        step = self.chunk_size(len(capture))
        for lo, hi in _chunks(m, step):
            rows = torch.arange(lo, hi)
            idx = ctx[lo:hi]
            d_chunk = None if delta is None else delta[lo:hi].to(device=dev, dtype=dt)
            fn = None
            if site is not None and (d_chunk is not None or edit or row_edit):
                fn = _last_position_edit(d_chunk, edit, row_edit, rows)
            if plan is not None:
                start, run_site, names = plan
                logits, store = self._run_from_block(idx, start, run_site, fn, names)
            elif self.fast and self._cache is not None:
                with _single_query_attention(subject):
                    logits, store, _ = subject.forward(
                        self.ids[idx, -1:], edits={site: fn} if fn and site else None,
                        capture=capture, use_cache=True,
                        past_key_values=self._select(idx.to(self._cache_device())),
                    )
            else:
                logits, store, _ = subject.forward(
                    self.ids[idx], edits={site: fn} if fn and site else None, capture=capture
                )
            assert logits is not None
            logits_parts.append(logits[:, -1])
            for s in capture:
                acts_parts[s].append(store[s][:, -1])
        if not logits_parts:
            empty = torch.empty(0, subject.vocab_size, device=dev, dtype=dt)
            return empty, {s: torch.empty(0, subject.d_model, device=dev, dtype=dt)
                           for s in capture}
        return _cat(logits_parts), {s: _cat(v) for s, v in acts_parts.items()}

    # ------------------------------------------------------------------ skipping early blocks
    def _skip_plan(
        self, site: str | None, capture: tuple[str, ...]
    ) -> tuple[int, str | None, dict[str, str]] | None:
        """Where the replay can start instead of block 0, or None.

        Blocks before the intervention see the clean last token, so the replay can begin at
        block ``S`` with the clean ``resid_pre`` of ``S`` as input: ``S = L + 1`` for an edit at
        ``blocks.L.hook_resid_post`` (the same tensor as ``blocks.{L+1}.hook_resid_pre``, where
        the edit is then applied) and ``S = L`` otherwise. The blocks before ``S`` are neither
        run nor gathered. Only for families whose decoder takes ``inputs_embeds`` as the
        residual stream unchanged, and when every captured site lies at or after ``S``.
        """
        subject = self.subject
        if site is None or subject.family.name not in _SKIP_FAMILIES:
            return None
        at = subject.site(site)
        start, run_site = at.layer, site
        names = {c: c for c in capture}
        if at.kind == "hook_resid_post" and at.layer + 1 < subject.n_layers:
            start = at.layer + 1
            run_site = f"blocks.{start}.hook_resid_pre"
            if site in names:
                names[site] = run_site
        if start == 0:
            return None
        if any(subject.site(mapped).layer < start for mapped in names.values()):
            return None
        return start, run_site, names

    def _clean_at(self, site: str) -> torch.Tensor:
        """Clean last-position activation at ``site`` for every context (computed once)."""
        if site in self.clean_acts:
            return self.clean_acts[site]
        extra = self._clean_extra.get(site)
        if extra is None:
            _, acts = self._run(torch.arange(self.n), None, None, None, (site,))
            extra = self._clean_extra[site] = acts[site]
        return extra

    def _run_from_block(
        self,
        idx: torch.Tensor,
        start: int,
        run_site: str | None,
        fn: Callable[[torch.Tensor], torch.Tensor] | None,
        names: dict[str, str],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        subject = self.subject
        h = self._clean_at(f"blocks.{start}.hook_resid_pre")[idx.to(self.clean_logits.device)]
        store: dict[str, torch.Tensor] = {}
        cache = self._select(idx.to(self._cache_device()), skip_below=start)
        edits = {run_site: fn} if fn is not None and run_site is not None else None
        with torch.no_grad(), _single_query_attention(subject), _skip_blocks(subject, start):
            with subject.hooks(edits, tuple(dict.fromkeys(names.values())), store):
                out = subject.model(
                    inputs_embeds=h.unsqueeze(1).to(subject.device), past_key_values=cache,
                    use_cache=True,
                )
        return out.logits, {orig: store[mapped] for orig, mapped in names.items()}

    def _cache_device(self) -> torch.device:
        for layer in self._cache.layers:
            if layer.keys is not None:
                return layer.keys.device
        return self.subject.device

    def _select(self, idx: torch.Tensor, skip_below: int = 0) -> Any:
        """A cache of the prefix rows ``idx`` whose layers write the new token into the free slot.

        The copies keep their class (sliding-window layers keep their window and cumulative
        length, so HF builds the model's own mask); only ``update`` and, for full layers,
        ``get_seq_length`` are replaced on the instance. The stored prefix is never mutated.
        """
        k = int(idx.numel())
        if not self._buffers or self._buffers[0][0].shape[0] < k:
            self._buffers = [
                (layer.keys.new_empty((k, *layer.keys.shape[1:])),
                 layer.values.new_empty((k, *layer.values.shape[1:])))
                for layer in self._cache.layers
            ]
        cache = copy.copy(self._cache)
        cache.layers = []
        for i, (layer, (kbuf, vbuf)) in enumerate(
            zip(self._cache.layers, self._buffers, strict=True)
        ):
            new = copy.copy(layer)
            if i >= skip_below:  # skipped blocks never read their cache: no gather
                new.keys = torch.index_select(layer.keys, 0, idx, out=kbuf[:k])
                new.values = torch.index_select(layer.values, 0, idx, out=vbuf[:k])
            prefix_len = int(layer.keys.shape[-2]) - 1
            new.update = functools.partial(_write_slot, new)
            if not getattr(layer, "is_sliding", False):
                new.get_seq_length = functools.partial(int, prefix_len)
            cache.layers.append(new)
        return cache


def _with_slot(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate batch parts ``[b, h, L, hd]`` into ``[n, h, L + 1, hd]`` (last slot zero)."""
    b = sum(int(p.shape[0]) for p in parts)
    h, seq, hd = parts[0].shape[1:]
    out = parts[0].new_zeros(b, h, seq + 1, hd)
    lo = 0
    for p in parts:
        out[lo:lo + p.shape[0], :, :seq] = p
        lo += int(p.shape[0])
    return out


_REPLAY_ATTENTION = "steerscope_single_query"
_SINGLE_QUERY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Families whose attention calls the shared HF attention interface with the standard arguments
(no soft-cap, no attention sinks): their replay may use :func:`_single_query_attention_forward`.
"""


@contextmanager
def _single_query_attention(subject: Subject) -> Iterator[None]:
    """Run the replay with a bmm attention for one query token instead of PyTorch's SDPA.

    With one query per row, SDPA's CPU flash kernel spends most of its time on per-row setup: two
    batched matmuls over ``[rows · kv_heads, group, L]`` measured 2× faster on the 656K model and
    the same to float rounding. Only for ``sdpa`` models of the families above; the model's own
    setting is restored on exit, and everything else runs the model's own attention.
    """
    cfg = subject.model.config
    if getattr(cfg, "model_type", None) not in _SINGLE_QUERY_FAMILIES or (
        getattr(cfg, "_attn_implementation", None) != "sdpa"
    ):
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_REPLAY_ATTENTION, _single_query_attention_forward)
    AttentionMaskInterface.register(_REPLAY_ATTENTION, sdpa_mask)
    cfg._attn_implementation = _REPLAY_ATTENTION
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"


def _single_query_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one query per row, ``query [b, h, 1, d]`` over ``key/value [b, hk, L, d]``.

    Query heads ``j·g … j·g + g − 1`` share key/value head ``j`` (HF's ``repeat_kv`` order).
    Returns ``[b, 1, h, d]`` like HF's SDPA wrapper. Anything unusual goes to HF's own SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q_len, d = query.shape
    hk, length = key.shape[1], key.shape[2]
    unusual = (
        q_len != 1 or h % hk or dropout or kwargs.get("softcap") is not None
        or kwargs.get("s_aux") is not None or value.shape[-1] != d
        or (attention_mask is not None and (attention_mask.shape[-1] != length
                                            or attention_mask.shape[1] != 1))
    )
    if unusual:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    g = h // hk
    scale = scaling if scaling is not None else d**-0.5
    scores = torch.bmm(
        query.reshape(b * hk, g, d), key.reshape(b * hk, length, d).transpose(1, 2)
    ).mul_(scale)
    if attention_mask is not None:
        mask = attention_mask.expand(b, -1, -1, -1).reshape(b, -1, 1, length)
        view = scores.view(b, hk, g, length)
        if mask.dtype == torch.bool:
            view.masked_fill_(~mask, float("-inf"))
        else:
            view.add_(mask.to(view.dtype))
    # half-precision models: normalise in float32, as the SDPA kernels do internally
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    out = torch.bmm(probs.to(value.dtype), value.reshape(b * hk, length, d))
    return out.view(b, h, 1, d).transpose(1, 2).contiguous(), None


def _write_slot(
    layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``update`` of a replay layer: the one new token goes into the reserved last slot.

    Returns the same tensors ``DynamicLayer.update`` (prefix + new token) and
    ``DynamicSlidingWindowLayer.update`` (kept window + new token) would return.
    """
    if key_states.shape[-2] != 1:
        raise RuntimeError("replay caches take exactly one new token")
    layer.keys[:, :, -1:] = key_states
    layer.values[:, :, -1:] = value_states
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length += 1
    return layer.keys, layer.values


_SKIP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox")
"""Families whose decoder uses ``inputs_embeds`` as the residual stream as given (no embedding
scale as in Gemma, no position embedding added as in GPT-2 / GPT-Neo) and whose blocks return the
hidden state alone, so blocks before the intervention can be replaced by a pass-through."""


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder block the replay does not need: returns its input."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.attention_type = getattr(block, "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def _skip_blocks(subject: Subject, start: int) -> Iterator[None]:
    """Blocks ``0 … start−1`` pass their input through for the duration (restored on exit)."""
    layers = subject.layers
    saved = [layers[i] for i in range(start)]
    try:
        for i, block in enumerate(saved):
            layers[i] = _PassThrough(block)
        yield
    finally:
        for i, block in enumerate(saved):
            layers[i] = block


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _last_position_edit(
    delta: torch.Tensor | None, edit: LastEdit | None, row_edit: RowEdit | None, rows: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An activation edit ``[k, pos, d] -> same`` that touches only the last position."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        last = x[:, -1]
        if delta is not None:
            last = last + delta
        if edit is not None:
            last = edit(last)
        if row_edit is not None:
            last = row_edit(last, rows)
        if x.shape[1] == 1:
            return last.unsqueeze(1)
        out = x.clone()
        out[:, -1] = last
        return out

    return apply


def _prefix_forward(subject: Subject, ids: torch.Tensor) -> Any:
    """The KV cache of ``ids`` from the decoder alone: the prefix's logits are never needed."""
    base = subject.model.base_model
    with torch.no_grad():
        out = base(input_ids=ids.to(subject.device), use_cache=True)
    return getattr(out, "past_key_values", None)


def _chunks(m: int, step: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, m, step):
        yield lo, min(m, lo + step)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() != 2:
        raise SteerscopeError(
            f"contexts must be a [n, length] tensor, got shape {tuple(ids.shape)}",
            "pass token ids of equal-length contexts",
        )
    if ids.shape[0] == 0:
        raise SteerscopeError("no contexts given", "pass at least one context")
    if ids.shape[1] < 2:
        raise SteerscopeError(
            f"contexts of {ids.shape[1]} token(s) are too short to steer the last position",
            "use contexts of at least 2 tokens (BOS + text)",
        )
    return ids.long().cpu()


def _is_plain_kv_cache(pkv: Any) -> bool:
    """True for a cache whose layers hold batch-first K/V tensors we may gather rows from."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    if type(pkv) is not DynamicCache or not pkv.layers:
        return False
    return all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
        and layer.keys is not None and layer.keys.dim() == 4
        for layer in pkv.layers
    )
