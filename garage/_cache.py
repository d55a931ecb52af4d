"""Where garage keeps files between runs: dequantized built-in models and exported graphs.

`GARAGE_CACHE=off` turns every cache off; `GARAGE_CACHE=DIR` puts it in DIR; otherwise it is
`$XDG_CACHE_HOME/garage` (`~/.cache/garage`).

An entry is a folder, written under a temporary name and renamed into place, so a reader never sees half
an entry. Writers of one entry take its lock (`filelock`) in turn, so two processes that need the same
graph export it once. Cache folders get shared (cluster file systems, container images, CI caches), so
every entry is sealed: an HMAC-SHA256 over its path and every file's name and bytes, under a per-user key
(`key`, 32 random bytes, mode 0600, in the cache root). An entry is read only after its seal checks out;
one that fails is deleted and made again, with a warning. A key that others could read or replace turns
the cache off, with a warning, since its seals would prove nothing.

May import: the standard library and filelock only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import stat
import uuid
from pathlib import Path
from typing import Iterator

from filelock import FileLock

log = logging.getLogger("garage")

OFF = ("off", "0", "false", "no", "none")
KEY = "key"  # the per-user secret, in the cache root
SEAL = "seal.hmac"  # in each entry: hex HMAC-SHA256 of its path and files
LOCKS = ".locks"  # in the cache root: one lock file per entry that is being made
_warned: set[str] = set()
_keys: dict[Path, bytes | None] = {}  # per cache folder, read once a process


def root() -> Path | None:
    """The cache folder, or None when `GARAGE_CACHE` turns caching off."""
    setting = os.environ.get("GARAGE_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "garage"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _secret(folder: Path) -> bytes | None:
    """The cache's key, made on first use; None (with a warning) when it is not private to this user. Read
    once per process and folder."""
    if folder not in _keys:
        _keys[folder] = _read_secret(folder)
    return _keys[folder]


def _read_secret(folder: Path) -> bytes | None:
    path = folder / KEY
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # made whole under a temporary name, then linked into place: never half a key
            tmp = folder / f".{KEY}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process made it first: theirs is the key
                pass
            finally:
                tmp.unlink()
        info = os.lstat(path)
        private = stat.S_ISREG(info.st_mode) and not info.st_mode & 0o077
        if private and hasattr(os, "getuid"):
            private = info.st_uid == os.getuid()
        key = path.read_bytes() if private else b""
    except OSError as err:
        _warn_once(f"garage's cache in {folder} is off: its key {path} cannot be made or read ({err}); "
                   "set GARAGE_CACHE to a folder of your own")
        return None
    if len(key) != 32:
        _warn_once(f"garage's cache in {folder} is off: its key {path} is not a private 32-byte file of this "
                   "user (mode 0600), so its entries could be forged; delete the folder, or set GARAGE_CACHE "
                   "to a folder of your own")
        return None
    return key


def entry(kind: str, key: str) -> Path | None:
    """The folder of one entry (which may not exist yet), or None when caching is off."""
    folder = root()
    if folder is None or _secret(folder) is None:
        return None
    return folder / kind / key


def _seal(folder: Path, files: dict[str, bytes | Path]) -> str:
    """HMAC-SHA256 over the entry's place in the cache and its files (bytes, or paths read in chunks): a
    valid entry moved to another key fails too."""
    secret = _secret(folder.parent.parent)
    if secret is None:
        raise OSError("the cache key is not usable")
    mac = hmac.new(secret, b"garage-cache-1\0" + f"{folder.parent.name}/{folder.name}".encode() + b"\0",
                   hashlib.sha256)
    for name in sorted(files):
        content = files[name]
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
        mac.update(name.encode() + b"\0" + size.to_bytes(8, "big"))
        if isinstance(content, bytes):
            mac.update(content)
            continue
        with open(content, "rb") as f:
            while chunk := f.read(1 << 22):
                mac.update(chunk)
    return mac.hexdigest()


def _paths(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _check(folder: Path, files: dict[str, bytes | Path]) -> bool:
    """Whether the entry's seal (taken out of `files`) matches the rest; a bad entry is deleted, with a
    warning."""
    try:
        seal = files.pop(SEAL, b"")
        found = seal if isinstance(seal, bytes) else seal.read_bytes()
        valid = hmac.compare_digest(found, _seal(folder, files).encode())  # bytes: any content compares
    except OSError as err:
        log.warning("cannot read the cache entry %s (%s); making it again", folder, err)
        valid = False
    if not valid:
        log.warning("the cache entry %s is not sealed by this cache's key (damaged, or written by someone else); "
                    "deleting it and making it again", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return valid


def read(folder: Path | None) -> dict[str, bytes] | None:
    """Every file of a sealed entry, by relative path, read once and checked; None when there is no entry.

    An entry whose seal is missing or wrong is deleted, with a warning: it is made again."""
    if folder is None or not folder.is_dir():
        return None
    try:
        contents = {name: path.read_bytes() for name, path in _paths(folder).items()}
    except OSError:  # unreadable: the seal check below fails on an empty entry, which is then deleted
        contents = {}
    if not _check(folder, dict(contents)):
        return None
    contents.pop(SEAL)
    return contents


def verified(folder: Path | None) -> bool:
    """Whether a sealed entry is there and whole, read in chunks (for large entries that another library
    then reads from disk itself)."""
    return folder is not None and folder.is_dir() and _check(folder, dict(_paths(folder)))


@contextlib.contextmanager
def locked(final: Path) -> Iterator[None]:
    """Hold the entry's lock: one process at a time makes it, and the others then find it made."""
    locks = final.parent.parent / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{final.parent.name}-{final.name}.lock")):
        yield


@contextlib.contextmanager
def writing(final: Path) -> Iterator[Path]:
    """A fresh temporary folder to fill; sealed and renamed to `final` when the block ends without error.

    If `final` appeared meanwhile (a writer that did not take the lock), ours is dropped. A block that fails
    leaves nothing behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / SEAL).write_text(_seal(final, dict(_paths(tmp))), encoding="ascii")
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
    """Delete every cache entry (the key stays); returns (entries, bytes) removed."""
    folder = root()
    if folder is None or not folder.is_dir():
        return 0, 0
    entries = size = 0
    for kind in folder.iterdir():
        if kind.name in (KEY, LOCKS):
            continue
        for item in kind.iterdir() if kind.is_dir() else [kind]:
            size += sum(f.stat().st_size for f in _files(item))
            entries += 1
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
    return entries, size
