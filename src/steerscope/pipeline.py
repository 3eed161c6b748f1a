"""The ``screen`` job: predictors → labels → evaluation → held-out screening → screen → report.

Each stage writes its table into the run directory and records a key (a digest of everything its
result depends on, including the upstream keys) in ``manifest.json``. A rerun skips every stage
whose key is unchanged and whose file exists, so a killed or extended run resumes where it
stopped; changing an option recomputes exactly the stages downstream of it. The two expensive
stages also resume *inside* the stage: predictors from their corpus checkpoint and feature
shards, labels from finished shards (under ``DIR/.work``, removed once the run is complete).

Feature sampling follows Duan's GPT-2 script: features whose final-token firing rate lies in
[0.002, 0.5] are eligible, and ``n_labelled`` of them evenly spaced through the frequency-sorted
list are labelled. The screen then predicts every feature; features outside that band are outside
the labelled population and are never put in a confident tier.

The library never prints: progress goes to ``progress(stage_description, fraction)``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from steerscope import assets, store
from steerscope.errors import SteerscopeError
from steerscope.report import FeatureCard, ReportData, Snippet, Steered, write_report
from steerscope.screening import (
    check_compatible,
    evaluate,
    headline,
    heldout_screening,
    min_labelled,
    screen_features,
)
from steerscope.screening.stats import jsonable

Progress = Callable[[str, float], None]

FILES = ("predictors.parquet", "labels.parquet", "heldout_labels.parquet", "screen.parquet",
         "evaluation.json", "report.html", "manifest.json")


@dataclass(frozen=True)
class ScreenConfig:
    """Every option of a screen run (all recorded in the manifest).

    ``predictors`` / ``labels``: paths of existing tables to use instead of computing them (a
    ``manifest.json`` beside each is checked for the same model and SAE).
    """

    sae: str = assets.DEFAULT_SAE
    downstream_sae: str | None = None  # None: the same embedded architecture one block later
    model: str | None = None
    corpus: str = "tinystories-train.txt"
    heldout_corpus: str = "tinystories-valid.txt"
    n_labelled: int = 600
    freq_band: tuple[float, float] = (0.002, 0.5)
    label_contexts: int = 2048
    heldout_contexts: int = 1024
    context_length: int = 48
    alpha: tuple[float, ...] | str = (1.0,)
    predictor_context_length: int = 64
    predictor_max_contexts: int | None = None
    seed: int = 0
    n_boot: int = 1000
    models: tuple[str, ...] = ("ridge", "gbm")
    n_per_group: int = 50
    heldout_set: str = "geometry"
    conformal_alpha: float = 0.2
    n_cards: tuple[int, int] = (8, 4)  # cleanest, messiest
    card_strength: float = 1.0  # × max activation; 4× degenerates into repetition on small models
    card_prompt: str = "Once upon a time, there was a little "
    card_tokens: int = 30
    memory_mb: float = 512.0
    predictors: str | None = None
    labels: str | None = None


@dataclass
class ScreenRun:
    """What a finished run produced."""

    out: Path
    headline: dict[str, Any]
    report: Path
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)


# =========================================================================== helpers
def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_digest(sae: Any) -> str:
    """A digest of an SAE's weights: a retrained SAE under the same name is a new SAE."""
    h = hashlib.sha256()
    for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """A corpus by its content: an edited corpus (even one of the same size) is a new corpus."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def default_downstream(sae: str) -> str:
    """The same embedded architecture one block later (``relu-blocks.0…`` → ``relu-blocks.1…``)."""
    import re

    m = re.fullmatch(r"(?P<arch>[a-z]+)-blocks\.(?P<l>\d+)\.(?P<kind>hook_\w+)", sae)
    if m:
        cand = f"{m['arch']}-blocks.{int(m['l']) + 1}.{m['kind']}"
        if cand in assets.embedded_sae_names():
            return cand
    raise SteerscopeError(
        f"no downstream SAE is known for '{sae}' (collateral is measured on a later SAE)",
        "pass --downstream-sae with an SAE at a later hook of the same model",
    )


def eligible(predictors: pd.DataFrame, band: tuple[float, float]) -> np.ndarray:
    """Duan's eligibility: final-token firing rate within ``band``."""
    col = "final_act_freq" if "final_act_freq" in predictors.columns else "token_act_freq"
    f = predictors[col].to_numpy(float)
    return (f >= band[0]) & (f <= band[1])


def sample_features(predictors: pd.DataFrame, n: int, band: tuple[float, float]) -> list[int]:
    """``n`` eligible features evenly spaced through the frequency-sorted list (GPT-2 script)."""
    ok = eligible(predictors, band)
    need = min_labelled()
    if ok.sum() < need:
        raise SteerscopeError(
            f"only {int(ok.sum())} features fire on {band[0]:g}–{band[1]:g} of final tokens; "
            f"screening needs at least {need} labelled features",
            "use a larger corpus, or a wider --freq-band",
        )
    col = "final_act_freq" if "final_act_freq" in predictors.columns else "token_act_freq"
    pool = predictors.loc[ok, ["feature", col]].sort_values([col, "feature"], ascending=False)
    if n >= len(pool):
        return sorted(int(f) for f in pool["feature"])
    idx = np.unique(np.linspace(0, len(pool) - 1, n).astype(int))
    return sorted(int(f) for f in pool["feature"].to_numpy()[idx])


def _table_with_manifest(path: str) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    p = Path(path)
    df = store.read_parquet(p)
    man = p.parent / "manifest.json"
    meta = json.loads(man.read_text()) if man.is_file() else None
    return df, meta


def _single_alpha(labels: pd.DataFrame) -> pd.DataFrame:
    if "alpha" in labels.columns and labels["alpha"].nunique() > 1:
        raise SteerscopeError(
            f"the labels table holds {labels['alpha'].nunique()} strengths per feature; "
            "screening compares features at one strength",
            "label with a single --alpha (Duan's default is 1)",
        )
    return labels


# =========================================================================== the job
class _Job:
    """One run directory: stage bookkeeping, lazy model/SAE loading, the stages themselves."""

    def __init__(self, out: Path, cfg: ScreenConfig, progress: Progress | None) -> None:
        self.out, self.cfg = out, cfg
        self.progress = progress or (lambda _w, _f: None)
        self.work = out / ".work"
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        old = out / "manifest.json"
        try:
            self.old = json.loads(old.read_text()) if old.is_file() else {}
        except json.JSONDecodeError:
            self.old = {}
        self.stages: dict[str, Any] = {}
        self._subject: Any = None
        self._sae: Any = None
        self._down: Any = None
        self.downstream = cfg.downstream_sae

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        if self._subject is not None:
            return
        from steerscope.saes import load_sae
        from steerscope.subject import Subject

        self.progress("loading model and SAEs", 0.0)
        self.model_path = assets.resolve_model(self.cfg.model)
        self._subject = Subject.load(self.model_path)
        self._sae = load_sae(*assets.resolve_sae(self.cfg.sae))
        self._sae.check(self._subject)
        self.downstream = self.cfg.downstream_sae or default_downstream(self.cfg.sae)
        self._down = load_sae(*assets.resolve_sae(self.downstream))
        from steerscope.labels import check_sites

        check_sites(self._subject, self._sae, self._down)
        if self._subject.tokenizer is None:
            raise SteerscopeError("the model has no tokenizer", "load a model directory with one")

    @property
    def subject(self) -> Any:
        self.load()
        return self._subject

    @property
    def sae(self) -> Any:
        self.load()
        return self._sae

    @property
    def down(self) -> Any:
        self.load()
        return self._down

    # ------------------------------------------------------------------ bookkeeping
    def fresh(self, stage: str, key: str, *files: str) -> bool:
        """True when ``stage`` already ran with ``key`` and its files exist."""
        old = (self.old.get("stages") or {}).get(stage) or {}
        ok = old.get("key") == key and all((self.out / f).is_file() for f in files)
        if ok:
            self.stages[stage] = old
            self.reused.append(stage)
        return ok

    def invalidate(self, *stages: str) -> None:
        """Forget ``stages`` before rewriting their files: a run killed mid-write must not leave
        an old key vouching for a new (or half-new) file."""
        changed = False
        self.reused = [r for r in self.reused if r not in stages]
        for st in stages:
            for d in (self.stages, self.old.get("stages") or {}):
                changed |= d.pop(st, None) is not None
        if changed:
            self.write_manifest()

    def done(self, stage: str, key: str, t0: float | None = None, *, seconds: float | None = None,
             **info: Any) -> None:
        """Record ``stage`` as finished with ``key`` — only after its files are written."""
        took = seconds if seconds is not None else time.perf_counter() - (t0 or 0.0)
        self.seconds[stage] = round(took, 2)
        self.stages[stage] = {"key": key, "seconds": self.seconds[stage], **info}
        self.write_manifest()

    def write_manifest(self, **extra: Any) -> None:
        cfg = self.cfg
        meta = store.manifest(
            model=getattr(self, "model_path", None) or self.old.get("model") or cfg.model,
            sae=cfg.sae, corpus=cfg.corpus, corpus_sha256=getattr(self, "corpus_sha", None),
            seed=cfg.seed, stage="screen", downstream_sae=self.downstream,
            heldout_corpus=cfg.heldout_corpus, config=asdict(cfg),
            # stages not visited this run keep their record (their keys still guard reuse)
            stages={**(self.old.get("stages") or {}), **self.stages},
            files=list(FILES), **extra,
        )
        store.write_json(jsonable(meta), self.out / "manifest.json")

    # ------------------------------------------------------------------ stages
    def predictors(self) -> tuple[pd.DataFrame, str]:
        cfg = self.cfg
        if cfg.predictors:
            table, meta = _table_with_manifest(cfg.predictors)
            key = digest({"file": cfg.predictors, "meta": meta, "rows": len(table)})
            self.pred_meta = meta
            if not self.fresh("predictors", key, "predictors.parquet"):
                self.invalidate("predictors")
                t0 = time.perf_counter()
                store.write_parquet(table, self.out / "predictors.parquet")
                self.done("predictors", key, t0, source=cfg.predictors)
            return table, key
        from steerscope.corpus import load_contexts
        from steerscope.predictors import PredictorConfig, compute_predictors

        pcfg = PredictorConfig(context_length=cfg.predictor_context_length,
                               max_contexts=cfg.predictor_max_contexts, memory_mb=cfg.memory_mb)
        cpath = assets.corpus_path(cfg.corpus)
        key = digest({"model": assets.resolve_model(cfg.model), "sae": cfg.sae,
                      "sae_w": weights_digest(self.sae), "corpus": str(cpath),
                      "corpus_sha": file_digest(cpath), "config": asdict(pcfg)})
        self.pred_meta = {"model": self.model_path, "sae": self.sae.name}
        if self.fresh("predictors", key, "predictors.parquet"):
            return store.read_parquet(self.out / "predictors.parquet"), key
        self.invalidate("predictors")
        t0 = time.perf_counter()
        ctx = load_contexts(self.subject.tokenizer, cpath, pcfg.context_length,
                            max_contexts=pcfg.max_contexts)
        self.corpus_sha = ctx.digest
        self.progress("predictors", 0.0)

        def prog(stage: str, done: int, total: int) -> None:
            frac = done / max(1, total)
            self.progress(f"predictors: {stage}", 0.8 * frac if stage == "corpus"
                          else 0.8 + 0.2 * frac)

        res = compute_predictors(self.subject, self.sae, ctx.ids, pcfg,
                                 work_dir=self.work / "predictors", key={"screen": key},
                                 progress=prog)
        store.write_parquet(res.table, self.out / "predictors.parquet")
        self.done("predictors", key, t0, corpus_sha256=ctx.digest, n_contexts=len(ctx),
                  info={k: v for k, v in res.info.items() if k != "predictor_sets"})
        return res.table, key

    def labels(self, predictors: pd.DataFrame, pkey: str) -> tuple[pd.DataFrame, str]:
        cfg = self.cfg
        if cfg.labels:
            table, meta = _table_with_manifest(cfg.labels)
            check_compatible(getattr(self, "pred_meta", None), _label_meta(meta))
            key = digest({"file": cfg.labels, "meta": meta, "rows": len(table), "p": pkey})
            if not self.fresh("labels", key, "labels.parquet"):
                self.invalidate("labels")
                t0 = time.perf_counter()
                store.write_parquet(table, self.out / "labels.parquet")
                self.done("labels", key, t0, source=cfg.labels)
            return _single_alpha(table), key
        from steerscope.corpus import load_contexts
        from steerscope.labels import LabelOptions, compute_labels, prepare

        feats = sample_features(predictors, cfg.n_labelled, cfg.freq_band)
        opts = LabelOptions(alphas=cfg.alpha, seed=cfg.seed, memory_mb=cfg.memory_mb)
        cpath = assets.corpus_path(cfg.corpus)
        key = digest({"p": pkey, "down": cfg.downstream_sae or default_downstream(cfg.sae),
                      "opts": asdict(opts) | {"memory_mb": None}, "features": feats,
                      "n": cfg.label_contexts, "len": cfg.context_length, "corpus": str(cpath)})
        if self.fresh("labels", key, "labels.parquet"):
            return store.read_parquet(self.out / "labels.parquet"), key
        self.invalidate("labels")
        t0 = time.perf_counter()
        ctx = load_contexts(self.subject.tokenizer, cpath, cfg.context_length,
                            max_contexts=cfg.label_contexts)
        state: dict[str, Any] = {}
        shard = 128
        n_shards = -(-len(feats) // shard)

        def compute(i: int) -> pd.DataFrame:
            if "setup" not in state:
                self.progress("labels: clean pass", 0.0)
                state["setup"] = prepare(self.subject, self.sae, self.down, ctx.ids, opts)
            return compute_labels(state["setup"], feats[i * shard:(i + 1) * shard])

        table = store.Shards(self.work / "labels", {"screen": key}).run(
            n_shards, compute, lambda i, n: self.progress("labels", i / n))
        alphas = state["setup"].alphas if "setup" in state else sorted(set(table["alpha"]))
        store.write_parquet(table, self.out / "labels.parquet")
        self.done("labels", key, t0, n_features=len(feats), alphas=alphas,
                  n_contexts=len(ctx), corpus_sha256=ctx.digest)
        return table, key

    def heldout_measure(self, alphas: Sequence[float], lkey: str) -> Callable[[Sequence[int]],
                                                                             pd.DataFrame]:
        """Labels of chosen features on NEW contexts: the held-out corpus, same α and protocol.

        Kept as ``heldout_labels.parquet`` (keyed by the labels and the chosen features), so
        re-running the evaluation with other options does not steer again.
        """
        cfg = self.cfg

        def measure(features: Sequence[int]) -> pd.DataFrame:
            from steerscope.corpus import load_contexts
            from steerscope.labels import LabelOptions, compute_labels, prepare

            key = digest({"l": lkey, "features": sorted(int(f) for f in features),
                          "corpus": cfg.heldout_corpus, "n": cfg.heldout_contexts,
                          "corpus_sha": file_digest(assets.corpus_path(cfg.heldout_corpus)),
                          "len": cfg.context_length, "seed": cfg.seed})
            if self.fresh("heldout_labels", key, "heldout_labels.parquet"):
                return store.read_parquet(self.out / "heldout_labels.parquet")
            self.invalidate("heldout_labels")
            t0 = time.perf_counter()
            hpath = assets.corpus_path(cfg.heldout_corpus)
            if hpath.resolve() == assets.corpus_path(cfg.corpus).resolve():
                raise SteerscopeError(
                    "the held-out corpus is the labelling corpus: the held-out test needs new "
                    "contexts", "pass a different --heldout-corpus")
            ctx = load_contexts(self.subject.tokenizer, hpath, cfg.context_length,
                                max_contexts=cfg.heldout_contexts)
            opts = LabelOptions(alphas=tuple(alphas), seed=cfg.seed + 1, memory_mb=cfg.memory_mb)
            setup = prepare(self.subject, self.sae, self.down, ctx.ids, opts)
            table = compute_labels(
                setup, list(features),
                progress=lambda w, f: self.progress("held-out labels on new contexts", f))
            store.write_parquet(table, self.out / "heldout_labels.parquet")
            self.done("heldout_labels", key, t0, n_contexts=len(ctx), corpus_sha256=ctx.digest)
            return table

        return measure


def _label_meta(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """The labels manifest's steering SAE (its ``sae`` field lists [primary, downstream])."""
    if not meta:
        return meta
    sae = meta.get("sae")
    if isinstance(sae, list) and sae:
        sae = sae[0]
    return {**meta, "sae": sae}


def run_screen(
    out: str | Path, config: ScreenConfig = ScreenConfig(), progress: Progress | None = None
) -> ScreenRun:
    """Run (or resume) the whole screen job into ``out``; see the module docstring."""
    cfg = config
    _check_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    job = _Job(out, cfg, progress)
    report = job.progress

    predictors, pkey = job.predictors()
    labels, lkey = job.labels(predictors, pkey)
    labels = _single_alpha(labels)

    # ---- evaluation (+ held-out + screen), one JSON
    ekey = digest({"l": lkey, "n_boot": cfg.n_boot, "seed": cfg.seed, "models": cfg.models,
                   "v": 2})
    hkey = digest({"e": ekey, "heldout": [cfg.heldout_corpus, cfg.heldout_contexts,
                                          cfg.n_per_group, cfg.heldout_set]})
    skey = digest({"e": ekey, "alpha": cfg.conformal_alpha, "band": cfg.freq_band})
    if (job.fresh("evaluation", ekey, "evaluation.json") and job.fresh("heldout", hkey)
            and job.fresh("screen", skey, "screen.parquet")):
        doc = json.loads((out / "evaluation.json").read_text())
        screen = store.read_parquet(out / "screen.parquet")
        fresh_headline = jsonable(headline(doc))  # the headline's rules may have changed
        if fresh_headline != doc.get("headline"):
            doc["headline"] = fresh_headline
            store.write_json(doc, out / "evaluation.json")
    else:
        job.invalidate("evaluation", "heldout", "screen", "report")
        t0 = time.perf_counter()
        ev = evaluate(predictors, labels, n_boot=cfg.n_boot, seed=cfg.seed, models=cfg.models,
                      progress=lambda w, f: report(f"evaluation: {w}", f))
        doc = ev.to_json()
        t_e = time.perf_counter() - t0
        t0 = time.perf_counter()
        alphas = sorted(set(labels["alpha"])) if "alpha" in labels.columns else [1.0]
        measure = None if cfg.labels else job.heldout_measure(alphas, lkey)
        ho = heldout_screening(predictors, labels, measure, predictor_set=cfg.heldout_set,
                               n_per_group=cfg.n_per_group, seed=cfg.seed, n_boot=cfg.n_boot,
                               progress=lambda w, f: report(w, f))
        doc["heldout"] = ho.to_json()
        t_h = time.perf_counter() - t0
        t0 = time.perf_counter()
        sc = screen_features(predictors, labels, cv=ev.cv, alpha=cfg.conformal_alpha,
                             domain=eligible(predictors, cfg.freq_band), seed=cfg.seed,
                             progress=lambda w, f: report(w, f))
        screen = sc.table
        doc["screen"] = sc.to_json()
        doc["headline"] = headline(doc)
        store.write_parquet(screen, out / "screen.parquet")
        store.write_json(jsonable(doc), out / "evaluation.json")
        job.done("evaluation", ekey, seconds=t_e)
        job.done("heldout", hkey, seconds=t_h, outcome=ho.outcome)
        job.done("screen", skey, t0, coverage=sc.summary["coverage"]["measured"])

    # ---- report (feature cards steer the model: reused when nothing it shows changed)
    rkey = digest({
        "e": ekey, "h": hkey, "s": skey, "headline": doc.get("headline"),
        "cards": [cfg.n_cards, cfg.card_strength, cfg.card_prompt, cfg.card_tokens],
        "version": store.package_versions(("steerscope",)),
    })
    if not job.fresh("report", rkey, "report.html"):
        job.invalidate("report")
        t0 = time.perf_counter()
        report("report: feature cards", 0.0)
        cards = feature_cards(job, predictors, screen, cfg)
        report("report: figures", 0.5)
        labelled = labels.merge(predictors, on="feature", how="inner", suffixes=("", "_pred"))
        run_info = {
            "model": job.model_path, "sae": cfg.sae, "downstream_sae": job.downstream,
            "corpus": cfg.corpus, "heldout_corpus": cfg.heldout_corpus,
            "n_features": len(predictors), "n_labelled": len(labels), "seed": cfg.seed,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            **{f"seconds_{k}": v for k, v in job.seconds.items()},
        }
        write_report(out / "report.html", ReportData(
            title=f"steerscope screen — {cfg.sae}", run=run_info, evaluation=doc,
            labelled=labelled, screen=screen, cards=cards))
        job.done("report", rkey, t0)
    path = out / "report.html"
    shutil.rmtree(job.work, ignore_errors=True)
    job.write_manifest(headline=doc.get("headline"))
    report("done", 1.0)
    return ScreenRun(out=out, headline=doc.get("headline") or {}, report=path,
                     seconds=job.seconds, reused=job.reused)


def _check_config(cfg: ScreenConfig) -> None:
    lo, hi = cfg.freq_band
    checks = [
        (cfg.n_labelled >= min_labelled(),
         f"--n-labelled {cfg.n_labelled} is below the {min_labelled()} features 5-fold "
         "cross-validation needs", f"use --n-labelled {max(min_labelled(), 300)} or more"),
        (0 <= lo < hi <= 1, f"frequency band {cfg.freq_band} is not a range in [0, 1]",
         "use e.g. --freq-band 0.002,0.5"),
        (0 < cfg.conformal_alpha < 1, f"interval miscoverage {cfg.conformal_alpha} is not in "
         "(0, 1)", "use e.g. 0.2 for 80 % intervals"),
        (cfg.n_boot >= 100, f"--n-boot {cfg.n_boot} is too few for 95 % CIs", "use 1000"),
        (cfg.label_contexts >= 48 and cfg.heldout_contexts >= 48,
         "fewer than 48 contexts cannot give each feature its 16 top / random / low contexts",
         "use --contexts 2048"),
    ]
    for ok, problem, fix in checks:
        if not ok:
            raise SteerscopeError(problem, fix)


def run_all_embedded(
    out: str | Path, config: ScreenConfig = ScreenConfig(), progress: Progress | None = None
) -> list[ScreenRun]:
    """The screen on the three embedded architectures at block 0 (downstream: block 1), each
    into ``out/<sae name>/``."""
    runs = []
    for name in assets.embedded_architectures("blocks.0.hook_resid_post"):
        arch = name.split("-")[0]
        cfg = replace(config, sae=name, downstream_sae=None)

        def prog(w: str, f: float, arch: str = arch) -> None:
            if progress is not None:
                progress(f"[{arch}] {w}", f)

        runs.append(run_screen(Path(out) / name, cfg, prog))
    return runs


# =========================================================================== feature cards
def feature_cards(job: _Job, predictors: pd.DataFrame, screen: pd.DataFrame,
                  cfg: ScreenConfig) -> list[FeatureCard]:
    """The cleanest and messiest in-domain features: predictions, measured labels, logit-lens
    tokens, top-activating snippets from the corpus, and one steered continuation each."""
    n_clean, n_messy = cfg.n_cards
    if n_clean + n_messy == 0 or not len(screen):
        return []
    inside = screen[screen["in_domain"]] if "in_domain" in screen.columns else screen
    inside = inside.sort_values("rank")
    chosen = pd.concat([inside.head(n_clean), inside.tail(n_messy)]).drop_duplicates("feature")
    feats = [int(f) for f in chosen["feature"]]
    snippets = top_snippets(job, feats, cfg)
    tok = job.subject.tokenizer
    pred = predictors.set_index("feature")
    cards = []
    for r in chosen.to_dict("records"):
        f = int(r["feature"])
        lens: list[str] = []
        if "logit_lens_tokens" in pred.columns:
            ids = pred.at[f, "logit_lens_tokens"]
            if ids is not None:
                lens = [tok.decode([int(i)]) for i in list(ids)[:10]]
        cards.append(FeatureCard(
            feature=f, rank=int(r["rank"]), tier=str(r["tier"]),
            pred=float(r["pred_clean_score"]), lo=float(r["pred_lo"]), hi=float(r["pred_hi"]),
            predicted={k[5:]: _f(r.get(k)) for k in r if k.startswith("pred_")
                       and k not in ("pred_lo", "pred_hi")},
            measured={k[9:]: _f(r.get(k)) for k in r if k.startswith("measured_")},
            logit_lens=lens, snippets=snippets.get(f, []),
            steered=steered_example(job, f, _f(pred.at[f, "token_act_max"])
                                    if "token_act_max" in pred.columns else None, cfg),
        ))
    return cards


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def top_snippets(job: _Job, features: Sequence[int], cfg: ScreenConfig,
                 n_contexts: int = 256, per_feature: int = 3) -> dict[int, list[Snippet]]:
    """Where each feature fires hardest in (the start of) the corpus, one snippet per context."""
    from steerscope.corpus import load_contexts

    subject, sae = job.subject, job.sae
    ctx = load_contexts(subject.tokenizer, assets.corpus_path(cfg.corpus),
                        cfg.predictor_context_length, max_contexts=n_contexts)
    idx = torch.as_tensor(list(features), dtype=torch.long)
    best_v = torch.full((len(features), n_contexts), -float("inf"))
    best_p = torch.zeros((len(features), n_contexts), dtype=torch.long)
    for lo in range(0, len(ctx), 64):
        acts = subject.capture(ctx.ids[lo:lo + 64], [sae.hook])[sae.hook]
        z = sae.encode(acts)[..., idx.to(acts.device)].float().cpu()  # [b, T, F]
        z[:, 0] = -float("inf")  # BOS: every feature's activation there is an artefact
        v, p = z.max(dim=1)  # [b, F]
        best_v[:, lo:lo + v.shape[0]] = v.T
        best_p[:, lo:lo + v.shape[0]] = p.T
    tok = subject.tokenizer
    out: dict[int, list[Snippet]] = {}
    for i, f in enumerate(features):
        top = torch.argsort(best_v[i], descending=True)[:per_feature]
        snips = []
        for c in top.tolist():
            a = float(best_v[i, c])
            if not a > 0:
                break
            p = int(best_p[i, c])
            ids = ctx.ids[c].tolist()
            snips.append(Snippet(before=tok.decode(ids[max(1, p - 12):p]),
                                 token=tok.decode(ids[p:p + 1]),
                                 after=tok.decode(ids[p + 1:p + 5]), activation=a))
        out[int(f)] = snips
    return out


def steered_example(job: _Job, feature: int, max_act: float | None,
                    cfg: ScreenConfig) -> Steered:
    """The card prompt continued greedily without and with the feature added at every position:
    ``card_strength × the feature's max activation × W_dec[f]`` (AxBench / Neuronpedia's "× max
    activation"), so the push is on the feature's own scale whatever the SAE's decoder norms;
    features that never fired fall back to ``card_strength × W_dec[f]``."""
    from steerscope.generation import Sampling, generate
    from steerscope.interventions import AdditiveSteer

    sampling = Sampling(max_new_tokens=cfg.card_tokens, temperature=0.0, seed=cfg.seed)
    if not hasattr(job, "_clean_text"):
        job._clean_text = generate(job.subject, [cfg.card_prompt], sampling)[0]  # type: ignore[attr-defined]
    if max_act is not None and np.isfinite(max_act) and max_act > 0:
        op = AdditiveSteer(feature, cfg.card_strength, positions="all", scale="feature_max",
                           max_activation=float(max_act))
        how = f"+{cfg.card_strength:g} × max activation ({max_act:.3g}) × W_dec[f], all positions"
    else:
        op = AdditiveSteer(feature, cfg.card_strength, positions="all")
        how = f"+{cfg.card_strength:g} × W_dec[f], all positions"
    steered = generate(job.subject, [cfg.card_prompt], sampling, op=op, sae=job.sae)[0]
    return Steered(prompt=cfg.card_prompt, clean=job._clean_text,  # type: ignore[attr-defined]
                   steered=steered, strength=cfg.card_strength, how=how)
