"""Where subfit writes: output locations are checked before any work, written atomically, and
nothing that is not subfit's own output is ever replaced.

The overwrite rule, the same for the CLI and the Python API:
- a file output (a JSON report) may be a new path, or an existing file when overwriting is
  allowed; a folder or anything that is not a regular file in its place is refused;
- a folder output (a plan) may be a new path, an empty folder, or a folder that holds only that
  output's own files when overwriting is allowed; a file, a model folder, or any folder with
  other files in it is refused;
- the location must be writable.
Outputs are first written under a temporary name beside the target and then renamed into place,
so an interruption leaves the old output or none, never half of one.
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OVERWRITE_HINT = "pass --overwrite (overwrite=True in Python) to replace it"


class OutputError(ValueError):
    """An output location that cannot be written, or only by losing something that is not ours."""


@dataclass(frozen=True)
class FolderFormat:
    """A folder output: what it is called in messages, the files it consists of, and a test that
    an existing folder holds one (so that only such a folder is ever replaced)."""

    name: str
    files: tuple[str, ...]
    holds_one: Callable[[Path], bool]


def check_output(path: str | os.PathLike, *, overwrite: bool = False, folder: FolderFormat | None = None) -> Path:
    """Refuse, with one line saying what to do, an output location the overwrite rule forbids:
    `folder` names the kind of folder output, None means a file. Returns the path to write (symbolic
    links resolved, so the link's target is what gets written). Call it before the work whose
    result goes there; the writers below call it again just before writing."""
    shown = Path(path)
    target = Path(os.path.realpath(Path(path).expanduser()))
    if folder is None:
        _check_file_target(shown, target, overwrite)
    else:
        _check_folder_target(shown, target, overwrite, folder)
    _check_writable(shown, target.parent)
    return target


def _check_file_target(shown: Path, target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise OutputError(f"{shown} is a folder; give a file path for the report, e.g. {shown / 'report.json'}.")
    if target.exists() and not target.is_file():
        raise OutputError(f"{shown} exists and is not a regular file; give the path of a new file.")
    if target.exists() and not overwrite:
        raise OutputError(f"{shown} already exists; choose another path or {OVERWRITE_HINT}.")


def _check_folder_target(shown: Path, target: Path, overwrite: bool, folder: FolderFormat) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(f"{shown} is a file; give the path of a new folder for the {folder.name}.")
    if not target.exists():
        return
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return  # an empty folder: nothing in it to lose
    others = [e for e in entries if e not in folder.files]
    if not folder.holds_one(target):
        what = "a model folder" if "config.json" in entries else f"not a {folder.name} folder"
        raise OutputError(f"{shown} exists and is {what} (it holds {_listing(entries)}); give the path of a new "
                          f"folder: a {folder.name} is written to a folder of its own.")
    if others:
        raise OutputError(f"{shown} holds a {folder.name} and other files ({_listing(others)}) that replacing it "
                          "would touch; move them out, or choose another path.")
    if not overwrite:
        raise OutputError(f"{shown} already holds a {folder.name}; choose another path or {OVERWRITE_HINT}.")


def _listing(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _check_writable(shown: Path, parent: Path) -> None:
    """The nearest existing ancestor must be a folder this process may create entries in."""
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {shown}: {existing} is a file, not a folder; choose another location.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {shown}: {existing} is not writable; choose another location.")


def _temporary_beside(target: Path) -> Path:
    """A hidden, unused name in the target's folder: a rename from there is atomic (same file system)."""
    return target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write a text file atomically under the overwrite rule; returns the path written."""
    target = check_output(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(target)
    try:
        with open(temporary, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = False,
               default: Callable[[Any], Any] | None = None) -> Path:
    """`data` as indented JSON, written like `write_text`. It is serialised before anything is
    written, so data that cannot be serialised leaves the disk untouched."""
    return write_text(path, json.dumps(data, indent=1, default=default), overwrite=overwrite)


@contextmanager
def staged_folder(path: str | os.PathLike, folder: FolderFormat, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to write a `folder` output into; when the block
    finishes, it takes `path`'s place (the old output's files are then deleted). If the block
    raises, the temporary folder is removed and `path` is left as it was."""
    target = check_output(path, overwrite=overwrite, folder=folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary_beside(target)
    staging.mkdir()
    try:
        yield staging
        for item in staging.iterdir():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
        _swap_in(staging, target, folder)
    finally:
        _remove(staging, folder)


def _swap_in(staging: Path, target: Path, folder: FolderFormat) -> None:
    """Rename `staging` to `target`, moving an existing `target` aside first and back on failure."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = _temporary_beside(target)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove(old, folder)


def _remove(path: Path, folder: FolderFormat) -> None:
    """Delete a staging or replaced folder: only the output's own files, then the folder if it is
    empty (anything else that appeared in it meanwhile is left where it is)."""
    if not path.is_dir():
        return
    for name in folder.files:
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass
