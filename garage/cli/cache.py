"""`garage cache [info|clear]`: where garage's cache is and how big, or empty it."""

from __future__ import annotations

import argparse
from typing import Any

from .. import _cache
from .common import EXIT_OK


def add(sub: Any) -> None:
    p = sub.add_parser("cache", help="show or clear garage's cache folder (dequantized models, exported graphs)")
    p.add_argument("action", nargs="?", choices=("info", "clear"), default="info",
                   help="info (default): where it is and how big; clear: delete every entry")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folder = _cache.root()
    if folder is None:
        print("the cache is off (GARAGE_CACHE=off)")
    elif args.action == "clear":
        entries, size = _cache.clear()
        print(f"removed {entries} entries ({size / 2**20:.1f} MiB) from {folder}")
    else:
        files, size = _cache.usage()
        print(f"{folder}: {size / 2**20:.1f} MiB in {files} files "
              "(GARAGE_CACHE=DIR moves it, GARAGE_CACHE=off turns it off)")
    return EXIT_OK
