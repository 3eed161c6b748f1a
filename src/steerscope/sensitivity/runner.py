"""Forward machinery of the sweeps: the clean pass once, then only what a perturbation changes.

Two modes, one readout (per-token ``KL(clean ‖ perturbed)`` of the next-token distribution and
the L2 change of the last block's ``hook_resid_post``):

* **last position** (:class:`LastPositionRunner`): the positions before the last one never see
  the edit, so :class:`steerscope.engine.CleanPrefix` replays only the last token over the cached
  clean prefix — one token of compute per (direction, length, context) instead of ``T``.
* **all positions** (:class:`AllPositionsRunner`): every position is perturbed, so every
  perturbation needs a forward of the layers above the site over all ``T`` positions; batching
  cannot remove that. What *can* be saved is everything below the site: the clean site
  activations are cached once, and each perturbed forward runs with the blocks below the site
  replaced by pass-through stubs while the site hook injects the perturbed activations. The
  layers above then compute exactly what a full re-forward with the same edit computes (the
  tests check equality). The ceiling of the saving is ``n_layers / (n_layers − p)`` blocks,
  ``p`` the first block whose computation changes; the embedding, final norm and unembedding
  (which for TinyStories-656K cost about as much as a block) are not saved, so the measured
  ratio stays below it.

``hook_attn_out`` / ``hook_mlp_out`` sites also inject the clean ``hook_resid_pre`` of their
block (the perturbed block itself must still run); ``hook_resid_pre`` / ``hook_resid_post``
sites need no second injection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from steerscope.errors import SteerscopeError
from steerscope.sensitivity.stats import kl_per_token
from steerscope.subject import Subject

DEFAULT_BATCH_TOKENS = 8192
SMALL_MODEL_D = 512
"""Below this width a CPU forward is dominated by per-op overhead, and a second OpenMP thread
costs more than it gives (measured on TinyStories-656K, 2 shared cores: 2.5× the CPU time and
2× the wall time of one thread)."""


@contextmanager
def cpu_threads(subject: Subject, threads: int | None = None) -> Iterator[int]:
    """Set torch's intra-op CPU threads for the duration, then restore them.

    ``threads=None`` chooses: one thread for a CPU model narrower than ``SMALL_MODEL_D``,
    torch's current setting otherwise. ``threads ≥ 1`` is used as given.
    """
    before = torch.get_num_threads()
    if threads is None:
        small = subject.device.type == "cpu" and subject.d_model < SMALL_MODEL_D
        threads = 1 if small else before
    if threads < 1:
        raise SteerscopeError(f"threads = {threads} is not positive", "use at least 1 thread")
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def last_layer_site(subject: Subject) -> str:
    """The readout site of the L2 change: the last block's ``hook_resid_post``."""
    return f"blocks.{subject.n_layers - 1}.hook_resid_post"


def first_changed_layer(subject: Subject, site: str) -> int:
    """Index of the first block whose computation a perturbation at ``site`` changes."""
    s = subject.site(site)
    return s.layer + 1 if s.kind == "hook_resid_post" else s.layer


def layer_ceiling(subject: Subject, site: str) -> float:
    """Best possible all-position speed-up from skipping unchanged blocks (in block units)."""
    p = first_changed_layer(subject, site)
    return subject.n_layers / max(subject.n_layers - p, 1)


def _rows(n: int, step: int) -> Iterator[slice]:
    for lo in range(0, n, max(step, 1)):
        yield slice(lo, min(n, lo + step))


# ---------------------------------------------------------------------------- all positions
def _block_output_shape(subject: Subject) -> int:
    """0 if a block returns a tensor, else the length of the tuple it returns."""
    found: dict[str, int] = {}

    def hook(_m: torch.nn.Module, _a: Any, out: Any) -> None:
        found["n"] = len(out) if isinstance(out, tuple) else 0

    handle = subject.layers[0].register_forward_hook(hook)
    try:
        subject.forward(torch.ones(1, 2, dtype=torch.long), logits=False,
                        capture=["blocks.0.hook_resid_post"])
    finally:
        handle.remove()
    return found.get("n", 0)


@contextmanager
def skip_blocks(
    subject: Subject, n_blocks: int, tuple_len: int | None = None
) -> Iterator[None]:
    """Replace the first ``n_blocks`` blocks by pass-through stubs for the duration.

    A stub returns its hidden-state input (packed like the real block's output), so the forward
    costs nothing below the site; the site hook then overwrites the hidden state with the cached
    activations. The real ``forward`` methods are restored even on error. ``tuple_len`` (0 for a
    tensor) is how the family's blocks pack their output; probed with a 2-token forward if None.
    """
    if n_blocks <= 0:
        yield
        return
    tuple_len = _block_output_shape(subject) if tuple_len is None else tuple_len

    def stub(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return h if tuple_len == 0 else (h, *([None] * (tuple_len - 1)))

    blocks = [subject.layers[i] for i in range(n_blocks)]
    had = [("forward" in b.__dict__, b.__dict__.get("forward")) for b in blocks]
    try:
        for b in blocks:
            b.forward = stub  # type: ignore[method-assign]
        yield
    finally:
        for b, (own, fn) in zip(blocks, had, strict=True):
            if own:
                b.forward = fn  # type: ignore[method-assign]
            else:
                del b.forward


class AllPositionsRunner:
    """Clean pass once; each batch of perturbed site activations runs the blocks above only."""

    def __init__(
        self,
        subject: Subject,
        ids: torch.Tensor,
        site: str,
        *,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        skip: bool = True,
    ) -> None:
        self.subject = subject
        self.ids = torch.as_tensor(ids).long().cpu()
        if self.ids.dim() != 2 or self.ids.shape[1] < 2:
            raise SteerscopeError(
                f"contexts must be [n, length ≥ 2], got shape {tuple(self.ids.shape)}",
                "use contexts of at least 2 tokens (BOS + text)",
            )
        self.site = site
        parsed = subject.site(site)
        self.last_site = last_layer_site(subject)
        self.batch_tokens = int(batch_tokens)
        self.skip = skip
        self.n_skip = first_changed_layer(subject, site) if skip else 0
        if parsed.kind in ("hook_attn_out", "hook_mlp_out"):
            self.n_skip = parsed.layer if skip else 0
            self.inject: str | None = f"blocks.{parsed.layer}.hook_resid_pre"
        else:
            self.inject = None
        n, t = self.ids.shape
        cap = [site, self.last_site] + ([self.inject] if self.inject else [])
        site_acts, last_acts, inject_acts, logp = [], [], [], []
        for rows in _rows(n, max(1, self.batch_tokens // t)):
            logits, store, _ = subject.forward(self.ids[rows], capture=cap)
            assert logits is not None
            site_acts.append(store[site].float().cpu())
            last_acts.append(store[self.last_site].float().cpu())
            if self.inject:
                inject_acts.append(store[self.inject].float().cpu())
            logp.append(torch.log_softmax(logits.float().cpu(), dim=-1))
        self.clean_site = torch.cat(site_acts)  # [n, T, d]
        self.clean_last = torch.cat(last_acts)
        self.clean_inject = torch.cat(inject_acts) if self.inject else None
        self.clean_logp = torch.cat(logp)  # [n, T, vocab]
        self.clean_p = self.clean_logp.exp()
        self._tuple_len = _block_output_shape(subject) if self.n_skip else 0

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    def evaluate(
        self, x_site: torch.Tensor, ctx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token KL and last-layer L2 change ``[B, T]`` for site activations ``[B, T, d]``.

        Row ``i`` of ``x_site`` replaces the site activation of context ``ctx[i]`` at every
        position (pass the clean value where a position is not perturbed).
        """
        ctx = torch.as_tensor(ctx).long().reshape(-1)
        if x_site.shape[0] != ctx.numel() or x_site.shape[1:] != self.clean_site.shape[1:]:
            raise SteerscopeError(
                f"site activations of shape {tuple(x_site.shape)} do not match "
                f"{ctx.numel()} contexts of shape {tuple(self.clean_site.shape[1:])}",
                "pass one [T, d] activation block per context",
            )
        kl_out = torch.empty(ctx.numel(), self.length)
        l2_out = torch.empty(ctx.numel(), self.length)
        step = max(1, self.batch_tokens // self.length)
        if step >= self.n:
            step -= step % self.n  # whole replicas of the contexts: clean sides broadcast
        for rows in _rows(ctx.numel(), step):
            logits, last = self.upper_forward(x_site[rows], ctx[rows])
            kl_out[rows] = self._kl(logits.float().cpu(), ctx[rows])
            l2_out[rows] = (last.float().cpu() - self.clean_last[ctx[rows]]).norm(dim=-1)
        return kl_out, l2_out

    def _kl(self, logits: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Per-token KL; when ``ctx`` is ``k`` copies of ``0..n−1`` the clean side broadcasts
        instead of being gathered (a [k·n, T, vocab] copy saved)."""
        b = ctx.numel()
        if b % self.n == 0 and torch.equal(ctx, torch.arange(self.n).repeat(b // self.n)):
            k = b // self.n
            kl = kl_per_token(self.clean_logp, logits.view(k, self.n, *logits.shape[1:]),
                              self.clean_p)
            return kl.reshape(b, -1)
        return kl_per_token(self.clean_logp[ctx], logits, self.clean_p[ctx])

    def upper_forward(
        self, x_site: torch.Tensor, ctx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, vocab]`` and last-block activations with the site set to ``x_site``."""
        subject = self.subject
        value = x_site.to(device=subject.device, dtype=subject.dtype)
        edits = {self.site: lambda _x: value}
        if self.inject is not None:
            assert self.clean_inject is not None
            pre = self.clean_inject[ctx].to(device=subject.device, dtype=subject.dtype)
            edits[self.inject] = lambda _x: pre
        with skip_blocks(subject, self.n_skip, self._tuple_len):
            logits, store, _ = subject.forward(
                self.ids[ctx], edits=edits, capture=[self.last_site]
            )
        assert logits is not None
        return logits, store[self.last_site]


# ---------------------------------------------------------------------------- last position
class LastPositionRunner:
    """Last-position perturbations replayed over the cached clean prefix (the shared engine)."""

    def __init__(
        self, subject: Subject, ids: torch.Tensor, site: str, *, memory_mb: float = 512.0
    ) -> None:
        from steerscope.engine import CleanPrefix

        self.subject = subject
        self.site = site
        subject.site(site)
        self.last_site = last_layer_site(subject)
        self.prefix = CleanPrefix.build(
            subject, ids, capture=tuple(dict.fromkeys([site, self.last_site])),
            memory_mb=memory_mb,
        )
        self.clean_site = self.prefix.clean_acts[site].float().cpu()  # [n, d]
        self.clean_last = self.prefix.clean_acts[self.last_site].float().cpu()
        self.clean_logp = torch.log_softmax(self.prefix.clean_logits.float().cpu(), dim=-1)
        self.clean_p = self.clean_logp.exp()

    @property
    def n(self) -> int:
        return self.prefix.n

    def evaluate(
        self, delta: torch.Tensor, ctx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """KL and last-layer L2 change ``[m]`` with ``delta[i]`` added at the last position."""
        ctx = torch.as_tensor(ctx).long().reshape(-1)
        logits, acts = self.prefix.replay(ctx, self.site, delta, capture=(self.last_site,))
        kl = kl_per_token(self.clean_logp[ctx], logits.float().cpu(), self.clean_p[ctx])
        l2 = (acts[self.last_site].float().cpu() - self.clean_last[ctx]).norm(dim=-1)
        return kl, l2


# ---------------------------------------------------------------------------- naive references
def naive_forward_kl(
    subject: Subject,
    ids: torch.Tensor,
    site: str,
    new_site: torch.Tensor,
    clean_logp: torch.Tensor,
    clean_last: torch.Tensor,
    positions: Sequence[int] | slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one full forward with the site activation replaced at ``positions``.

    ``new_site [n, len(positions), d]`` are the replacement values. Returns per-token KL and
    last-layer L2 ``[n, T]`` at every position (unperturbed positions before the first edited
    one are zero up to rounding).
    """
    value = new_site.to(device=subject.device, dtype=subject.dtype)

    def edit(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, positions] = value
        return out

    last = last_layer_site(subject)
    logits, store, _ = subject.forward(ids, edits={site: edit}, capture=[last])
    assert logits is not None
    kl = kl_per_token(clean_logp, logits.float().cpu())
    l2 = (store[last].float().cpu() - clean_last).norm(dim=-1)
    return kl, l2
