"""Atomic output: write to a temporary file beside the target, then rename.

A crash mid-write never leaves a truncated result behind, and an existing file is only
replaced once the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    The temporary file keeps the target's suffix (some writers dispatch on it). On error
    the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = target.suffix if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            # mkstemp creates files readable by the owner only; give the result the
            # permissions of a normally created file (0666 minus the umask).
            os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_json_atomic(target: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``target`` atomically."""
    return write_text_atomic(
        target, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n"
    )


def write_csv_atomic(
    target: str | os.PathLike, frame: pd.DataFrame, *, index: bool = False, **kwargs: Any
) -> Path:
    """Write a DataFrame as CSV to ``target`` atomically."""
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=index, **kwargs)
    return Path(target)


def write_parquet_atomic(
    target: str | os.PathLike, frame: pd.DataFrame, *, index: bool = False
) -> Path:
    """Write a DataFrame as Parquet to ``target`` atomically."""
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=index)
    return Path(target)


def write_h5ad_atomic(target: str | os.PathLike, adata: Any, **kwargs: Any) -> Path:
    """Write an AnnData to ``target`` atomically."""
    with atomic_path(target, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp, **kwargs)
    return Path(target)


def read_yaml(path: str | os.PathLike, *, what: str) -> Any:
    """Parse a YAML file, or raise a one-line :class:`~pertbench.errors.ConfigError`.

    ``what`` names the file in messages (``"config"``, ``"search space file"``). Messages
    give the line of a syntax error but never the file's text.
    """
    import yaml

    from pertbench.errors import ConfigError, InputFileError

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{what} '{path}' does not exist; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} '{path}' is not a text (UTF-8) file") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise ConfigError(f"{what} '{path}' is not valid YAML{line}: {problem}") from exc
