"""Train the project's SAEs with SAELens's own trainer and write them in SAELens format.

No public SAE exists for the embedded model (TinyStories-656K), so the project trains its own:
ReLU (SAELens ``standard``, L1 penalty), JumpReLU and TopK at ``blocks.{0,1}.hook_resid_post``.

How SAELens is used, and where we deviate (each for a stated reason):

* The subject model is wrapped in SAELens's ``HookedProxyLM`` (what ``model_class_name=
  "AutoModelForCausalLM"`` builds), so its hook names are HF module paths (``model.layers.0``).
  We map the TransformerLens site name to that path with the subject's architecture family
  table, and write the TransformerLens name into the saved ``cfg.json``, because every SAE in
  the wild (and :mod:`steerscope.subject`) names sites that way.
* Data comes from our own :mod:`steerscope.corpus` contexts (BOS + packed documents), handed to
  ``LanguageModelSAETrainingRunner`` as a pre-tokenised ``datasets.Dataset``
  (``override_dataset``); SAELens itself cannot reach the Hub here. Its ``ActivationsStore``
  computes the activations once and we keep them in memory (the corpus is ~240K tokens, 120 MB),
  because re-running the LLM every epoch would cost about a third of the CPU time and the three
  SAEs at a site can share one pass. Batches are i.i.d. tokens: a fresh seeded permutation of
  all tokens per epoch (the store's own buffer only mixes nearby contexts).
* ``b_dec`` starts at the activation mean and the norm scaling factor is computed from all
  activations, see :func:`_init_from_statistics` for why.
* The BOS position is excluded from training with SAELens's ``seqpos_slice=(1, None)``: its
  residual norm is ~3x that of every other position and an SAE spent on it wastes latents.
  The evaluation (:mod:`steerscope.quality`) likewise leaves BOS clean.
* We build the runner (model wrapper, activation store, training SAE) and then drive SAELens's
  ``SAETrainer`` ourselves rather than calling ``runner.run()``: ``run()`` installs process-wide
  SIGINT/SIGTERM handlers (and fails outside the main thread) and has no progress hook. The
  training loop, losses, LR schedule, dead-latent tracking and activation-norm folding are all
  SAELens's.
* SAELens's tqdm bars, warnings and log lines are silenced: library code never prints. Progress
  goes to an optional ``progress(what, fraction)`` callback instead.

Everything is deterministic from ``seed``: the torch RNG (SAE init, shuffling buffer) is seeded
inside :func:`torch.random.fork_rng` so the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from steerscope.errors import SteerscopeError

Architecture = Literal["relu", "jumprelu", "topk"]
Progress = Callable[[str, float], None]
"""``progress(what, fraction)``: a short description and the overall fraction done, 0 to 1."""

ARCHITECTURES: tuple[Architecture, ...] = ("relu", "jumprelu", "topk")
SAELENS_ARCHITECTURE: dict[str, str] = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}
EMBEDDED_SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
EMBEDDED_MODEL_NAME = "raincandy-u/TinyStories-656K"
TRAIN_CORPUS = "tinystories-train.txt"
TRAINABLE_KINDS = ("hook_resid_post", "hook_attn_out", "hook_mlp_out")


@dataclass(frozen=True)
class SAETrainingConfig:
    """Everything that shapes one SAE besides its architecture, site, width and seed.

    Sparsity knobs only apply to their architecture (``l1_coefficient`` to relu,
    ``l0_coefficient``/``jumprelu_*`` to jumprelu, ``k``/``aux_loss_coefficient`` to topk).
    """

    context_size: int = 128
    training_tokens: int = 500_000
    batch_size: int = 1024  # tokens per SAE step
    lr: float = 3e-3
    lr_warm_up_steps: int = 30
    lr_decay_fraction: float = 0.2  # final linear decay to 0 over this fraction of steps
    adam_beta2: float = 0.999
    # input scaled so that E‖x‖ = sqrt(d_in) while training (folded into the saved weights),
    # so the sparsity coefficients below mean the same thing at every layer
    normalize_activations: str = "expected_average_only_in"
    decoder_init_norm: float = 0.1
    # relu (SAELens "standard"): L1 on decoder-norm-weighted activations
    l1_coefficient: float = 1.5
    l1_warm_up_fraction: float = 0.05
    # jumprelu
    l0_coefficient: float = 0.1
    l0_warm_up_fraction: float = 0.05
    jumprelu_sparsity_loss_mode: str = "step"
    jumprelu_target_l0: float | None = None
    jumprelu_init_threshold: float = 0.1
    jumprelu_bandwidth: float = 0.05
    jumprelu_pre_act_loss_coefficient: float | None = None
    jumprelu_ste_to_input: bool = False
    # topk
    k: int = 32
    aux_loss_coefficient: float = 1.0
    # a latent that has not fired for this many steps counts as dead (TopK aux loss and
    # JumpReLU pre-act loss target those); SAELens's default of 1000 exceeds our whole run
    dead_feature_window: int = 50
    # start b_dec at the mean activation (see _init_from_statistics)
    init_b_dec_to_mean: bool = True
    # contexts per LLM forward when caching activations through SAELens's activation store
    store_batch_size_prompts: int = 32

    @property
    def total_steps(self) -> int:
        return self.training_tokens // self.batch_size


DEFAULT_CONFIG = SAETrainingConfig()

# The exact settings of the committed SAEs (see embedded/saes/TRAINED_WITH.md).
EMBEDDED_CONFIGS: dict[tuple[str, str], SAETrainingConfig] = {
    ("relu", "blocks.0.hook_resid_post"): dataclasses.replace(DEFAULT_CONFIG, l1_coefficient=1.0),
    ("relu", "blocks.1.hook_resid_post"): dataclasses.replace(
        DEFAULT_CONFIG, l1_coefficient=0.8, lr=6e-3, training_tokens=1_000_000
    ),
    ("jumprelu", "blocks.0.hook_resid_post"): DEFAULT_CONFIG,
    ("jumprelu", "blocks.1.hook_resid_post"): DEFAULT_CONFIG,
    ("topk", "blocks.0.hook_resid_post"): DEFAULT_CONFIG,
    ("topk", "blocks.1.hook_resid_post"): DEFAULT_CONFIG,
}


def embedded_name(architecture: str, hook: str) -> str:
    """Directory name of an embedded SAE, e.g. ``relu-blocks.0.hook_resid_post``."""
    return f"{architecture}-{hook}"


# ---------------------------------------------------------------------------------- public API
def train_sae(
    model_dir: str | Path,
    corpus_path: str | Path,
    hook: str,
    architecture: Architecture,
    out_dir: str | Path,
    *,
    d_sae: int = 2048,
    seed: int = 0,
    config: SAETrainingConfig | None = None,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Train one SAE on ``model_dir`` at ``hook`` from the text in ``corpus_path``.

    Writes ``cfg.json`` + ``sae_weights.safetensors`` (loadable with
    ``sae_lens.SAE.load_from_disk``) and SAELens's ``runner_cfg.json`` to ``out_dir`` and returns
    it. ``model_name`` is what the config records as the model (default: the directory).
    """
    from steerscope.corpus import load_contexts
    from steerscope.subject import Subject

    cfg = config or DEFAULT_CONFIG
    subject = Subject.load(model_dir)
    if subject.tokenizer is None:
        raise SteerscopeError(
            f"model '{model_dir}' has no tokenizer", "train from a directory with tokenizer files"
        )
    contexts = load_contexts(subject.tokenizer, corpus_path, length=cfg.context_size)
    return train_sae_on_contexts(
        subject, contexts.ids, hook, architecture, out_dir, d_sae=d_sae, seed=seed, config=cfg,
        model_name=model_name or str(model_dir),
        dataset_name=Path(corpus_path).name, dataset_sha256=contexts.digest, progress=progress,
    )


def train_sae_on_contexts(
    subject: Any,
    contexts: torch.Tensor,
    hook: str,
    architecture: Architecture,
    out_dir: str | Path,
    *,
    d_sae: int = 2048,
    seed: int = 0,
    config: SAETrainingConfig | None = None,
    model_name: str = "model",
    dataset_name: str = "contexts",
    dataset_sha256: str = "",
    progress: Progress | None = None,
    activations: torch.Tensor | None = None,
) -> Path:
    """Train one SAE on an already-loaded :class:`~steerscope.subject.Subject` (or HF causal LM)
    from token contexts ``[n, T]`` that start with BOS; see :func:`train_sae`.

    ``activations`` (from :func:`collect_activations` for the same model, contexts and hook) lets
    several SAEs at one site share a single pass of the model. The model is deep-copied before
    SAELens wraps it, since ``HookedProxyLM`` attaches forward hooks it never removes.
    """
    from steerscope.subject import Subject

    cfg = config or DEFAULT_CONFIG
    if architecture not in SAELENS_ARCHITECTURE:
        raise SteerscopeError(
            f"unknown SAE architecture '{architecture}'", f"use one of {', '.join(ARCHITECTURES)}"
        )
    if not isinstance(subject, Subject):
        subject = Subject(subject)
    site = subject.site(hook)
    if site.kind not in TRAINABLE_KINDS:
        raise SteerscopeError(
            f"training at '{hook}' is not supported", f"train at one of {TRAINABLE_KINDS}"
        )
    if contexts.ndim != 2 or contexts.shape[1] != cfg.context_size:
        raise SteerscopeError(
            f"contexts have shape {tuple(contexts.shape)}, expected [n, {cfg.context_size}]",
            "build them with steerscope.corpus at the config's context_size",
        )
    hf_hook = hf_module_path(subject, hook)
    d_in = subject.d_model
    steps = cfg.total_steps
    if steps < 1:
        raise SteerscopeError(
            f"training_tokens={cfg.training_tokens} is less than one batch of {cfg.batch_size}",
            "raise training_tokens",
        )

    out = Path(out_dir)
    label = f"{architecture} {hook}"

    with _quiet_saelens(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        runner_cfg = _runner_config(
            cfg, architecture, hook=hf_hook, d_in=d_in, d_sae=d_sae, seed=seed,
            model_name=model_name, dataset_name=dataset_name,
        )
        runner = _build_runner(subject, contexts, runner_cfg, hf_hook)
        if activations is None:
            activations = _store_activations(runner.activations_store, contexts, cfg)
        elif activations.ndim != 2 or activations.shape[1] != d_in:
            raise SteerscopeError(
                f"activations have shape {tuple(activations.shape)}, expected [n, {d_in}]",
                "pass the output of collect_activations for this hook",
            )

        from sae_lens.training.sae_trainer import SAETrainer

        trainer = SAETrainer(
            cfg=runner_cfg.to_sae_trainer_config(),
            sae=runner.sae,
            data_provider=_ShuffledActivations(
                activations, cfg.batch_size, seed,
                None if progress is None else lambda n: progress(label, min(n / steps, 1.0)),
            ),
            evaluator=None,
            save_checkpoint_fn=None,
        )
        _init_from_statistics(trainer, activations, cfg)
        start = time.perf_counter()
        sae = trainer.fit()
        seconds = time.perf_counter() - start

    meta = sae.cfg.metadata
    meta.hook_name = hook
    meta.hf_hook_name = hf_hook
    meta.model_name = model_name
    meta.model_class_name = "AutoModelForCausalLM"
    meta.hook_head_index = None
    meta.context_size = cfg.context_size
    meta.prepend_bos = True
    meta.seqpos_slice = (1, None)
    meta.exclude_special_tokens = False
    meta.disable_concat_sequences = False
    meta.dataset_path = dataset_name
    meta.dataset_sha256 = dataset_sha256
    meta.model_from_pretrained_kwargs = {}
    meta.training_seed = seed
    meta.training_steps = trainer.n_training_steps
    meta.training_tokens = trainer.n_training_samples
    meta.training_seconds = round(seconds, 1)
    sae.save_inference_model(out)
    runner_dict = runner_cfg.to_dict()
    runner_dict["hook_name"] = hook
    runner_dict["hf_hook_name"] = hf_hook
    (out / "runner_cfg.json").write_text(json.dumps(runner_dict, indent=1, default=str))
    if progress is not None:
        progress(label, 1.0)
    return out


def train_embedded(
    out_root: str | Path,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    model_dir: str | Path | None = None,
    corpus: str | Path | None = None,
    validation_corpus: str | Path | None = None,
    measure: bool = True,
) -> list[Path]:
    """Train the six embedded SAEs (ReLU, JumpReLU, TopK × blocks 0 and 1) into ``out_root``.

    Uses the exact settings in :data:`EMBEDDED_CONFIGS`. With ``measure`` (the default) each
    SAE's quality on the validation corpus is written beside it as ``quality.json``, which
    ``steerscope info`` shows. Returns the six directories.
    """
    from steerscope.assets import corpus_path, resolve_model
    from steerscope.corpus import load_contexts
    from steerscope.saes import load_sae
    from steerscope.subject import Subject

    model_src = resolve_model(model_dir)
    train_file = corpus_path(str(corpus) if corpus is not None else TRAIN_CORPUS)
    subject = Subject.load(model_src)
    if subject.tokenizer is None:
        raise SteerscopeError(f"model '{model_src}' has no tokenizer", "pass a model directory")
    jobs = [(arch, hook) for hook in EMBEDDED_SITES for arch in ARCHITECTURES]
    # the cost of one job is its token count; quality measurement counts as a small extra
    weights = [EMBEDDED_CONFIGS[j].training_tokens for j in jobs]
    total = float(sum(weights))
    done = 0.0
    contexts_by_length: dict[int, Any] = {}
    acts_by_site: dict[tuple[int, str], torch.Tensor] = {}
    paths: list[Path] = []
    root = Path(out_root)
    for (arch, hook), weight in zip(jobs, weights, strict=True):
        cfg = EMBEDDED_CONFIGS[(arch, hook)]
        if cfg.context_size not in contexts_by_length:
            contexts_by_length[cfg.context_size] = load_contexts(
                subject.tokenizer, train_file, length=cfg.context_size
            )
        contexts = contexts_by_length[cfg.context_size]
        key = (cfg.context_size, hook)
        if key not in acts_by_site:
            acts_by_site.clear()  # one site's activations in memory at a time
            acts_by_site[key] = collect_activations(subject, contexts.ids, hook, cfg)

        def report(what: str, frac: float, _done: float = done, _w: float = weight) -> None:
            if progress is not None:
                progress(what, (_done + _w * frac) / total)

        path = train_sae_on_contexts(
            subject, contexts.ids, hook, arch, root / embedded_name(arch, hook),
            seed=seed, config=cfg, model_name=EMBEDDED_MODEL_NAME,
            dataset_name=train_file.name, dataset_sha256=contexts.digest,
            progress=report if progress is not None else None, activations=acts_by_site[key],
        )
        if measure:
            from steerscope.quality import measure_on_validation

            if progress is not None:
                progress(f"measuring {arch} {hook}", (done + weight) / total)
            quality = measure_on_validation(
                subject, load_sae(path), corpus=validation_corpus
            )
            (path / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
        paths.append(path)
        done += weight
    return paths


def hf_module_path(subject: Any, hook: str) -> str:
    """The HF module path whose *output* is the TransformerLens site ``hook``.

    ``blocks.L.hook_resid_post`` is the output of decoder block L (before the final norm, which
    HF's last ``hidden_states`` entry includes); attn/mlp outputs follow the family table.
    """
    site = subject.site(hook)
    base = f"{subject.family.layers}.{site.layer}"
    if site.kind == "hook_resid_post":
        return base
    if site.kind == "hook_attn_out":
        return f"{base}.{subject.family.attn_out}"
    if site.kind == "hook_mlp_out":
        return f"{base}.{subject.family.mlp_out}"
    raise SteerscopeError(
        f"'{hook}' is the input of a module, which SAELens's HF wrapper cannot hook",
        f"train at one of {TRAINABLE_KINDS}",
    )


# ---------------------------------------------------------------------------------- internals
def collect_activations(
    subject: Any, contexts: torch.Tensor, hook: str, config: SAETrainingConfig | None = None
) -> torch.Tensor:
    """Activations ``[n · (T−1), d_model]`` at ``hook`` for every non-BOS token of ``contexts``,
    computed by SAELens's ``ActivationsStore`` (what its trainer would stream)."""
    from steerscope.subject import Subject

    cfg = config or DEFAULT_CONFIG
    if not isinstance(subject, Subject):
        subject = Subject(subject)
    hf_hook = hf_module_path(subject, hook)
    with _quiet_saelens():
        runner_cfg = _runner_config(
            cfg, "relu", hook=hf_hook, d_in=subject.d_model, d_sae=1, seed=0,
            model_name="model", dataset_name="contexts",
        )
        runner = _build_runner(subject, contexts, runner_cfg, hf_hook)
        return _store_activations(runner.activations_store, contexts, cfg)


class _ShuffledActivations:
    """Training batches from cached activations: each epoch a fresh seeded permutation of all
    tokens, so batches are i.i.d. tokens (SAELens's own buffer only mixes nearby contexts)."""

    def __init__(
        self,
        activations: torch.Tensor,
        batch_size: int,
        seed: int,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        if activations.shape[0] < batch_size:
            raise SteerscopeError(
                f"only {activations.shape[0]} training tokens for a batch of {batch_size}",
                "use more text or a smaller batch_size",
            )
        self.activations = activations
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.on_step = on_step
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0
        self.n = 0

    def __iter__(self) -> _ShuffledActivations:
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.order.numel():
            self.order = torch.randperm(self.activations.shape[0], generator=self.generator)
            self.pos = 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        self.n += 1
        if self.on_step is not None and self.n % 25 == 0:
            self.on_step(self.n)
        return self.activations[idx]


def _build_runner(subject: Any, contexts: torch.Tensor, runner_cfg: Any, hf_hook: str) -> Any:
    """SAELens's runner around a private copy of the model (HookedProxyLM) and our contexts."""
    from datasets import Dataset
    from sae_lens import LanguageModelSAETrainingRunner
    from sae_lens.load_model import HookedProxyLM

    model = copy.deepcopy(subject.model).eval()
    model.config.use_cache = False
    proxy = HookedProxyLM(model, subject.tokenizer, hook_names=[hf_hook])
    dataset = Dataset.from_dict({"input_ids": contexts.to(torch.int64).tolist()})
    return LanguageModelSAETrainingRunner(
        runner_cfg, override_dataset=dataset, override_model=proxy
    )


@torch.no_grad()
def _store_activations(store: Any, contexts: torch.Tensor, cfg: SAETrainingConfig) -> torch.Tensor:
    """One pass of the model over ``contexts`` through the store (BOS dropped by seqpos_slice).

    Cached once rather than recomputed every epoch: the LLM forward would otherwise cost about a
    third of the training time on CPU, and the three SAEs at a site can share it.
    """
    d_in = store.d_in
    chunks = []
    for start in range(0, contexts.shape[0], cfg.store_batch_size_prompts):
        batch = contexts[start:start + cfg.store_batch_size_prompts]
        chunks.append(store.get_activations(batch).reshape(-1, d_in).float())
    return torch.cat(chunks)


@torch.no_grad()
def _init_from_statistics(trainer: Any, activations: torch.Tensor, cfg: SAETrainingConfig) -> None:
    """Exact SAELens norm scaling from all activations, and ``b_dec`` at their (scaled) mean.

    The residual stream here has a large constant part (the mean carries ~45% of E‖x‖², one
    coordinate ~7x the typical size). ``b_dec`` starts at zero in SAELens v6 and Adam moves it by
    ~lr per step, so learning that offset would take thousands of steps while latents waste L0
    on it; starting ``b_dec`` at the data mean (the usual geometric-median/mean init) fixes that.
    """
    x = activations.double()
    scale = 1.0
    if cfg.normalize_activations == "expected_average_only_in":
        scale = float(activations.shape[1] ** 0.5 / x.norm(dim=-1).mean())
        # set before fit(): SAELens then skips its own batch estimate, and still folds it at the end
        trainer.activation_scaler.scaling_factor = scale
    if cfg.init_b_dec_to_mean:
        trainer.sae.b_dec.data.copy_((x.mean(dim=0) * scale).to(trainer.sae.b_dec.dtype))


def _runner_config(
    cfg: SAETrainingConfig,
    architecture: str,
    *,
    hook: str,
    d_in: int,
    d_sae: int,
    seed: int,
    model_name: str,
    dataset_name: str,
) -> Any:
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.config import LoggingConfig

    steps = cfg.total_steps
    common: dict[str, Any] = dict(
        d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu",
        normalize_activations=cfg.normalize_activations, decoder_init_norm=cfg.decoder_init_norm,
    )
    if architecture == "relu":
        from sae_lens.saes.standard_sae import StandardTrainingSAEConfig

        sae_cfg: Any = StandardTrainingSAEConfig(
            **common, l1_coefficient=cfg.l1_coefficient,
            l1_warm_up_steps=int(cfg.l1_warm_up_fraction * steps),
        )
    elif architecture == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig

        sae_cfg = JumpReLUTrainingSAEConfig(
            **common, l0_coefficient=cfg.l0_coefficient,
            l0_warm_up_steps=int(cfg.l0_warm_up_fraction * steps),
            jumprelu_init_threshold=cfg.jumprelu_init_threshold,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
            jumprelu_sparsity_loss_mode=cfg.jumprelu_sparsity_loss_mode,  # type: ignore[arg-type]
            target_l0=cfg.jumprelu_target_l0,
            pre_act_loss_coefficient=cfg.jumprelu_pre_act_loss_coefficient,
            jumprelu_ste_to_input=cfg.jumprelu_ste_to_input,
        )
    else:
        from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

        sae_cfg = TopKTrainingSAEConfig(
            **common, k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient,
        )
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=model_name,
        model_class_name="AutoModelForCausalLM",
        hook_name=hook,
        dataset_path=dataset_name,
        is_dataset_tokenized=True,
        streaming=False,
        context_size=cfg.context_size,
        seqpos_slice=(1, None),
        prepend_bos=True,
        training_tokens=cfg.training_tokens,
        train_batch_size_tokens=cfg.batch_size,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        lr=cfg.lr,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=int(cfg.lr_decay_fraction * steps),
        adam_beta2=cfg.adam_beta2,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(steps, 1),
        device="cpu",
        seed=seed,
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        verbose=False,
    )


@contextlib.contextmanager
def _quiet_saelens() -> Iterator[None]:
    """Silence SAELens's progress bars, warnings and log lines for the duration."""
    import sae_lens.training.activation_scaler as scaler_mod
    import sae_lens.training.sae_trainer as trainer_mod
    from tqdm.auto import tqdm

    quiet_tqdm = functools.partial(tqdm, disable=True)
    lens_logger = logging.getLogger("sae_lens")
    old_level = lens_logger.level
    old_trainer_tqdm, old_scaler_tqdm = trainer_mod.tqdm, scaler_mod.tqdm
    trainer_mod.tqdm = quiet_tqdm  # type: ignore[assignment]
    scaler_mod.tqdm = quiet_tqdm  # type: ignore[assignment]
    lens_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        trainer_mod.tqdm = old_trainer_tqdm  # type: ignore[assignment]
        scaler_mod.tqdm = old_scaler_tqdm  # type: ignore[assignment]
        lens_logger.setLevel(old_level)


def config_dict(cfg: SAETrainingConfig) -> dict[str, Any]:
    """A JSON-ready view of a training config."""
    return asdict(cfg)


def with_overrides(cfg: SAETrainingConfig, **changes: Any) -> SAETrainingConfig:
    """A copy of ``cfg`` with some fields changed (for sweeps and fast tests)."""
    return replace(cfg, **changes)
