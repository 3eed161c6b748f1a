"""The embedded default: TinyStories-656K and the project's own SAEs for it.

A new user should be able to run every method offline in minutes, so the default model resolves
without configuration: an explicit path, then ``STEERSCOPE_MODEL``, then the Hub id when the Hub
is reachable (or cached), then the copy in ``shared/data`` beside the checkout. The model's
weights are never part of the package; our SAEs (a few MB) are.
"""

from __future__ import annotations

import os
from pathlib import Path

from steerscope.errors import SteerscopeError

HUB_ID = "raincandy-u/TinyStories-656K"
SHARED_MODEL = Path("shared/data/tinystories-656k")
SHARED_CORPORA = Path("shared/data/corpora")
EMBEDDED_SAES = Path(__file__).parent / "embedded" / "saes"
DEFAULT_SAE = "relu-blocks.0.hook_resid_post"
DEFAULT_DOWNSTREAM_SAE = "relu-blocks.1.hook_resid_post"


def _ancestors() -> list[Path]:
    seen: list[Path] = []
    for start in (Path.cwd(), Path(__file__).resolve()):
        for p in (start, *start.parents):
            if p not in seen:
                seen.append(p)
    return seen


def shared_path(relative: Path) -> Path | None:
    """``relative`` under the nearest ``shared/`` next to the working directory or package."""
    for p in _ancestors():
        cand = p / relative
        if cand.exists():
            return cand
    return None


def _hub_snapshot() -> Path | None:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(HUB_ID, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: fall through to shared/
            return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(HUB_ID, etag_timeout=3))
    except Exception:  # noqa: BLE001 - Hub unreachable: fall through to shared/
        return None


def resolve_model(explicit: str | Path | None = None) -> str:
    """Where the subject model comes from, in the documented order of precedence."""
    if explicit:
        return str(explicit)
    env = os.environ.get("STEERSCOPE_MODEL")
    if env:
        return env
    hub = _hub_snapshot()
    if hub is not None:
        return str(hub)
    local = shared_path(SHARED_MODEL)
    if local is not None:
        return str(local)
    raise SteerscopeError(
        f"cannot find the default model {HUB_ID}: the Hub is unreachable and no "
        f"{SHARED_MODEL} lies beside the working directory",
        "pass --model DIR or set STEERSCOPE_MODEL",
    )


def corpus_path(name: str = "tinystories-train.txt") -> Path:
    """A corpus file: a path as given, else a file of ``shared/data/corpora``."""
    p = Path(name)
    if p.is_file():
        return p
    found = shared_path(SHARED_CORPORA / name)
    if found is None:
        raise SteerscopeError(
            f"corpus '{name}' not found (neither a file nor in {SHARED_CORPORA})",
            "pass a path to a text file",
        )
    return found


def embedded_sae_names() -> list[str]:
    if not EMBEDDED_SAES.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_SAES.iterdir() if (p / "cfg.json").is_file())


EMBEDDED_ARCHS = ("relu", "jumprelu", "topk")


def embedded_architectures(hook: str = "blocks.0.hook_resid_post") -> list[str]:
    """The ReLU, JumpReLU and TopK embedded SAEs at ``hook`` (the papers' three architectures)."""
    names = [f"{arch}-{hook}" for arch in EMBEDDED_ARCHS]
    missing = [n for n in names if n not in embedded_sae_names()]
    if missing:
        raise SteerscopeError(f"the embedded SAE '{missing[0]}' is missing",
                              "reinstall steerscope or run `steerscope train-sae`")
    return names


def embedded_sae_path(name: str) -> Path:
    path = EMBEDDED_SAES / name
    if not (path / "cfg.json").is_file():
        raise SteerscopeError(
            f"no embedded SAE named '{name}'",
            "choose one of "
            + (", ".join(embedded_sae_names()) or "(none: run steerscope train-sae)"),
        )
    return path


def resolve_sae(spec: str) -> tuple[str, str | None]:
    """``spec`` → (source, sae_id) for :func:`steerscope.saes.load_sae`.

    Accepts an embedded name, a local directory, or ``release:sae_id`` for the SAELens registry.
    """
    if spec in embedded_sae_names():
        return str(embedded_sae_path(spec)), None
    if Path(spec).expanduser().exists():
        return spec, None
    if ":" in spec:
        release, sae_id = spec.split(":", 1)
        return release, sae_id
    raise SteerscopeError(
        f"SAE '{spec}' is not an embedded SAE, a directory or a 'release:sae_id'",
        f"embedded SAEs: {', '.join(embedded_sae_names())}",
    )
