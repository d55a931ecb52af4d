"""Where garage keeps files between runs: dequantized built-in models and exported graphs.

`GARAGE_CACHE=off` turns every cache off; `GARAGE_CACHE=DIR` puts it in DIR; otherwise it is
`$XDG_CACHE_HOME/garage` (`~/.cache/garage`). An entry is a folder, written under a temporary name and
renamed into place: a reader never sees half an entry, and when two processes write the same entry at
once, the first rename wins and the other's copy is dropped. Nothing in the cache is executed or
unpickled: entries hold JSON and safetensors only.

May import: the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

OFF = ("off", "0", "false", "no", "none")


def root() -> Path | None:
    """The cache folder, or None when `GARAGE_CACHE` turns caching off."""
    setting = os.environ.get("GARAGE_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "garage"


def entry(kind: str, key: str) -> Path | None:
    """The folder of one entry (which may not exist yet), or None when caching is off."""
    folder = root()
    return None if folder is None else folder / kind / key


@contextlib.contextmanager
def writing(final: Path) -> Iterator[Path]:
    """A fresh temporary folder to fill; renamed to `final` when the block ends without error.

    If `final` appeared meanwhile (another process wrote it), ours is dropped: both hold the same content.
    A block that fails leaves nothing behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:  # another writer won the race (a non-empty folder cannot be renamed over)
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _files(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]


def usage() -> tuple[int, int]:
    """(files, bytes) in the cache."""
    folder = root()
    files = _files(folder) if folder is not None and folder.is_dir() else []
    return len(files), sum(f.stat().st_size for f in files)


def clear() -> tuple[int, int]:
    """Delete every cache entry; returns (entries, bytes) removed."""
    folder = root()
    if folder is None or not folder.is_dir():
        return 0, 0
    entries = size = 0
    for kind in folder.iterdir():
        for item in kind.iterdir() if kind.is_dir() else [kind]:
            size += sum(f.stat().st_size for f in _files(item))
            entries += 1
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
    return entries, size
