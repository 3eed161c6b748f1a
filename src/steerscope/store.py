"""Tables, manifests and resumable shards, all written atomically.

A killed run must never leave a half-written table that a later stage would read as complete:
everything is written to a temporary file in the same directory and renamed into place (rename
is atomic on POSIX). Long stages write shards; a rerun skips shards that already exist, so the
final table is identical whether or not the run was interrupted.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from steerscope.errors import SteerscopeError


@contextmanager
def atomic_path(path: str | Path):  # noqa: ANN201 - a context manager yielding a Path
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); a result file gets the usual umask mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def read_parquet(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise SteerscopeError(f"table '{p}' does not exist", "run the stage that writes it first")
    try:
        return pd.read_parquet(p)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise SteerscopeError(
            f"table '{p}' is corrupt: {str(exc).splitlines()[0]}", "delete it and rerun"
        ) from None


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    return Path(path)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def package_versions(names: Iterable[str] = ("steerscope", "torch", "transformers", "sae-lens",
                                             "numpy", "pandas", "scikit-learn")) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def manifest(
    *, model: str, sae: str | list[str] | None, corpus: str | None, corpus_sha256: str | None,
    seed: int, **extra: Any,
) -> dict[str, Any]:
    """Everything needed to reproduce a run."""
    return {
        "model": model,
        "sae": sae,
        "corpus": corpus,
        "corpus_sha256": corpus_sha256,
        "seed": seed,
        "versions": package_versions(),
        **extra,
    }


class Shards:
    """A table computed in numbered shards under ``directory``; finished shards are reused.

    ``key`` identifies the job (model, SAE, corpus hash, options); shards written under another
    key are not reused, so changing an option cannot silently mix results.
    """

    def __init__(self, directory: str | Path, key: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.key = key
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = self.dir / "key.json"
        if stamp.exists() and json.loads(stamp.read_text()) != json.loads(
            json.dumps(key, sort_keys=True, default=_jsonable)
        ):
            for old in self.dir.glob("shard-*.parquet"):
                old.unlink()
        write_json(key, stamp)

    def path(self, i: int) -> Path:
        return self.dir / f"shard-{i:05d}.parquet"

    def done(self, i: int) -> bool:
        return self.path(i).is_file()

    def run(
        self, n_shards: int, compute: Callable[[int], pd.DataFrame],
        progress: Callable[[int, int], None] | None = None,
    ) -> pd.DataFrame:
        """Compute missing shards in order and return all of them concatenated."""
        for i in range(n_shards):
            if not self.done(i):
                write_parquet(compute(i), self.path(i))
            if progress is not None:
                progress(i + 1, n_shards)
        return pd.concat([pd.read_parquet(self.path(i)) for i in range(n_shards)],
                         ignore_index=True)
