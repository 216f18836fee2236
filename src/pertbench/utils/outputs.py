"""The output policy shared by every command: never lose what the user already had.

Three kinds of output exist, and each command checks its ``--out`` with one call to
:func:`check_output` before it reads any data:

``"file"``
    One file (``split``, ``preprocess``, ``simulate``, ``predict``, ``scenario ...``). An
    existing file is replaced only with ``overwrite=True`` (``--overwrite``); the write
    itself is atomic (:mod:`pertbench.utils.io`).
``"folder"``
    A folder of results made in one go (``train``, ``evaluate``, ``scenario scaling``). An
    existing non-empty folder is replaced only with ``overwrite=True``, and then as a whole:
    the new results are written into a hidden sibling folder that replaces the old one only
    once complete (:func:`new_folder`), so no stale file of an earlier run survives and a
    failed run leaves the old folder as it was.
``"resumable"``
    A folder that a rerun continues (``tune``, ``benchmark``, ``celltype-transfer``,
    ``sensitivity``, ``cross-study``). An existing folder is resumed; ``overwrite=True``
    starts afresh, setting the earlier contents aside until the new run succeeds
    (:func:`results_folder`). A folder this run created is removed again when the run fails
    before it produced any result (from an existing folder, only what the run added), so a
    failed first attempt never blocks the next one.

For every kind, an output equal to an input, or inside an input folder, is refused, as is an
output whose folder cannot be written (probed by creating a file: permission bits say
nothing for root or on read-only file systems). Tables that accumulate results over runs
merge new rows into the existing file with :func:`merge_table`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import pandas as pd

from pertbench.errors import OutputError

OutputKind = Literal["file", "folder", "resumable"]
KINDS = ("file", "folder", "resumable")
#: Hidden siblings used while a folder is being replaced: ``.<name>.partial-<pid>`` holds the
#: new results, ``.<name>.old-<pid>`` the earlier ones until the new run succeeded.
PARTIAL_TAG = ".partial-"
OLD_TAG = ".old-"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def _probe_writable(folder: Path, option: str, out: Path) -> None:
    """Create and delete a file in ``folder``; raise :class:`OutputError` if that fails."""
    try:
        fd, name = tempfile.mkstemp(prefix=".pertbench-probe-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"cannot write to folder '{folder}' ({reason}), so {option} '{out}' cannot be "
            f"created; choose another {option}"
        ) from exc
    os.close(fd)
    os.unlink(name)


def check_output(
    path: str | os.PathLike,
    *,
    kind: OutputKind = "file",
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Path:
    """Check that ``path`` may be written as an output of ``kind``; return it as a Path.

    Parameters
    ----------
    path
        The output file or folder.
    kind
        ``"file"``, ``"folder"`` or ``"resumable"`` (see the module docstring).
    inputs
        Files and folders the command reads (``None`` entries are ignored): the output may
        not be one of them or lie inside one.
    overwrite
        Allow replacing an existing output (``--overwrite``).
    option
        The option name used in messages (``--out``, ``--out-dir``).

    Raises
    ------
    OutputError
        One line saying what is wrong and how to fix it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    out = Path(path)
    target = _resolved(out)
    for source in inputs:
        if source is None:
            continue
        source_path = _resolved(source)
        if target == source_path:
            raise OutputError(
                f"{option} '{out}' is also an input of this command; write to another path "
                "(inputs are never replaced)"
            )
        if source_path.is_dir() and _is_within(target, source_path):
            raise OutputError(
                f"{option} '{out}' lies inside the input folder '{source}'; write outside it"
            )
        if kind != "file" and overwrite and _is_within(source_path, target):
            raise OutputError(
                f"{option} '{out}' holds the input '{source}', which --overwrite would delete; "
                f"choose another {option}"
            )
    if os.path.lexists(out):
        is_folder = out.is_dir()
        if kind == "file" and is_folder:
            raise OutputError(f"{option} '{out}' is a folder; give the path of a file")
        if kind != "file" and not is_folder:
            raise OutputError(f"{option} '{out}' is a file; give the path of a folder")
        if kind == "file" and not overwrite:
            raise OutputError(
                f"'{out}' already exists; pass --overwrite to replace it or choose another {option}"
            )
        if kind == "folder" and not overwrite and any(out.iterdir()):
            raise OutputError(
                f"folder '{out}' already exists and is not empty; pass --overwrite to replace it "
                f"or choose another {option}"
            )
        _probe_writable(out if is_folder else out.parent, option, out)
        return out
    existing = _nearest_existing(out.parent if out.parent != out else out)
    if not existing.is_dir():
        raise OutputError(
            f"'{existing}' is a file, so {option} '{out}' cannot be created inside it; "
            f"choose another {option}"
        )
    _probe_writable(existing, option, out)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_stale_siblings(out: Path) -> None:
    """Remove hidden partial folders of ``out`` left by killed runs (their process is gone)."""
    parent = out.parent
    if not parent.is_dir():
        return
    prefix = f".{out.name}{PARTIAL_TAG}"
    for candidate in parent.glob(f"{prefix}*"):
        pid = candidate.name[len(prefix) :]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)


def _swap_in(new: Path, out: Path) -> None:
    """Move folder ``new`` onto ``out``; an existing ``out`` is deleted only afterwards."""
    backup = None
    if os.path.lexists(out):
        backup = out.parent / f".{out.name}{OLD_TAG}{os.getpid()}"
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out, backup)
    try:
        os.replace(new, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def new_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``out`` to write into; it becomes ``out`` on success.

    Call :func:`check_output` (``kind="folder"``) first. On success an existing ``out`` is
    replaced as a whole; on any error the partial folder is removed and ``out`` is left as
    it was. Partial folders of killed runs are cleaned up on the next call.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = out.parent / f".{out.name}{PARTIAL_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def results_folder(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    has_results: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield the resumable folder ``out`` (created if needed).

    Parameters
    ----------
    out
        The folder; call :func:`check_output` (``kind="resumable"``) first.
    overwrite
        Start afresh: earlier contents are moved to a hidden sibling, deleted when the run
        succeeds and put back when it fails.
    has_results
        Whether the folder holds anything worth keeping. When the run fails and this says
        ``False``, a folder created by the run is removed, and from a folder that existed
        before only what the run added (default: the folder is not empty).
    """
    out = Path(out)
    has_results = has_results or (lambda folder: any(folder.iterdir()))
    created = not os.path.lexists(out)
    backup = None
    if overwrite and not created:
        backup = out.parent / f".{out.name}{OLD_TAG}{os.getpid()}"
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out, backup)
        created = True
    out.mkdir(parents=True, exist_ok=True)
    existing = set() if created else set(os.listdir(out))
    try:
        yield out
    except BaseException:
        if backup is not None:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(backup, out)
        elif created and out.is_dir() and not has_results(out):
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir() and not has_results(out):
            # A folder the user had: take back only what this run added (lock files...).
            for name in set(os.listdir(out)) - existing:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def merge_table(path: str | os.PathLike, new: pd.DataFrame, *, key: Sequence[str]) -> pd.DataFrame:
    """``new`` merged into the table at ``path``: rows with the same ``key`` are replaced,
    other earlier rows are kept (in their order, before the new ones). Nothing is written.

    Used by the workflows whose reruns add results (``celltype-transfer`` with another cell
    type, ``sensitivity``, ``cross-study``) so that a rerun never drops earlier rows.
    """
    path = Path(path)
    if not path.is_file():
        return new.reset_index(drop=True)
    try:
        old = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
    except (OSError, ValueError, pd.errors.ParserError):
        return new.reset_index(drop=True)  # a damaged table is rebuilt from this run's rows
    missing = [k for k in key if k not in old.columns]
    if missing or old.empty:
        return new.reset_index(drop=True)
    if new.empty:
        return old
    as_text = {k: str for k in key}
    old_keys = pd.MultiIndex.from_frame(old[list(key)].astype(as_text))
    new_keys = pd.MultiIndex.from_frame(new[list(key)].astype(as_text))
    kept = old[~old_keys.isin(new_keys)]
    return pd.concat([kept, new], ignore_index=True)
