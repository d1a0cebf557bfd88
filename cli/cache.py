"""`deltaprop cache`: where the compiled CPU kernels are cached, what is there, and clearing it.

    deltaprop cache              the folder, why it is the one (DELTAPROP_CACHE_DIR, NUMBA_CACHE_DIR or the
                                 per-user default), its kernels and size, and stale folders beside it
    deltaprop cache --list       also one line per cached kernel
    deltaprop cache --clear      remove every kernel cache of deltaprop (the next run compiles again)
"""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("--list", action="store_true", help="one line per cached kernel: versions and size")
    parser.add_argument("--clear", action="store_true",
                        help="remove deltaprop's kernel caches (this version's and stale ones)")


def human_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def summary(facts: dict) -> str:
    """One line: the folder, its origin, what it holds."""
    return (f"{facts['path']} ({facts['origin']}): {facts['kernels']} kernels, {facts['versions']} compiled "
            f"versions, {human_size(facts['bytes'])}")


def run(args) -> int:
    from deltaprop.kernels import cache

    facts = cache.describe()
    print(f"kernel cache: {summary(facts)}")
    if facts["stale_folders"]:
        print(f"stale: {facts['stale_folders']} folders beside it (other versions, CPUs or sources; never loaded), "
              f"{human_size(facts['stale_bytes'])}")
    if args.list:
        for entry in cache.cache_entries():
            print(f"  {entry.kernel:<60} {entry.versions:>3} versions  {human_size(entry.bytes):>9}")
    if args.clear:
        try:
            removed, freed = cache.clear_cache()
        except OSError as e:
            print(f"deltaprop cache: error: cannot clear {facts['path']}: {e}", file=sys.stderr)
            return 1
        print(f"cleared: {removed} files, {human_size(freed)}")
    return 0
