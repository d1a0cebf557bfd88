"""Where compiled CPU kernels are cached on disk: never inside the installed package.

    cache_dir()       the folder the Numba kernels of this process load from and save to
    cache_entries()   what it holds: one entry per cached kernel, with its compiled versions and size
    describe()        the folder, why it is that one, its size and the stale folders beside it
    clear_cache()     removes every kernel cache of deltaprop (this version's and stale ones)

The folder is, first rule that applies:

    $DELTAPROP_CACHE_DIR/KEY
    $NUMBA_CACHE_DIR/cpu_HASH        where Numba itself puts the caches of a source folder (as for any Numba program)
    USER_CACHE/deltaprop/KEY         USER_CACHE: $XDG_CACHE_HOME or ~/.cache on Linux, ~/Library/Caches on
                                     macOS, %LOCALAPPDATA% on Windows (there: ...\\deltaprop\\Cache\\KEY)

KEY names the deltaprop, Numba and Python versions and the CPU, and ends with a hash of the CPU's
features and of the kernels' sources: a cache compiled by another version (even an edited checkout of
this one) or for another CPU is never loaded, and sits in a folder of its own until ``clear_cache``.
Numba checks only the source file that defines a kernel, not the helpers it calls from other files.

``enable(dispatcher)`` turns on disk caching for one of deltaprop's kernels, in that folder. It is what
``deltaprop.kernels.cpu`` calls before a kernel's first compile; importing this module imports no Numba.
A folder that cannot be written means one ``KernelCacheWarning`` and kernels compiled in memory.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

ENV = "DELTAPROP_CACHE_DIR"
KERNELS = Path(__file__).resolve().parent  # the sources that the key hashes
CPU_SOURCES = KERNELS / "cpu"  # the folder whose jitted functions are cached here
KEY_PREFIX = "deltaprop-"  # every keyed folder's name starts so: clear_cache removes only those
CACHE_SUFFIXES = (".nbi", ".nbc")  # Numba's index and data files; its temporary files contain ".tmp."


class KernelCacheWarning(UserWarning):
    """The kernel cache folder cannot be written: kernels compile in memory, in every new process."""


@dataclass(frozen=True)
class CacheLocation:
    path: Path  # the folder of this process's kernels
    origin: str  # the rule that chose it: "DELTAPROP_CACHE_DIR", "NUMBA_CACHE_DIR" or "per-user default"
    root: Path  # the folder whose keyed subfolders are deltaprop's caches (``path`` itself for NUMBA_CACHE_DIR)


@dataclass(frozen=True)
class CacheEntry:
    kernel: str  # the jitted function, e.g. "sgd_step_float32_relu_softmax_xent_False"
    versions: int  # compiled signatures in the cache (data files)
    bytes: int  # index and data files together


def user_cache_root() -> Path:
    """deltaprop's folder in the platform's per-user cache directory."""
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA") or os.path.join(Path.home(), "AppData", "Local")
        return Path(local) / "deltaprop" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "deltaprop"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg if os.path.isabs(xdg) else Path.home() / ".cache") / "deltaprop"  # a relative one is ignored (XDG)


def _digest(*parts) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part if isinstance(part, bytes) else str(part).encode())
        hasher.update(b"\0")
    return hasher.hexdigest()[:12]


@functools.cache
def cache_key() -> str:
    """The keyed folder's name: deltaprop-VERSION_numba-VERSION_PYTHON_CPUNAME-HASH, the hash over the
    CPU's features as Numba compiles for them (NUMBA_CPU_NAME/NUMBA_CPU_FEATURES included) and the
    kernels' sources."""
    import numba
    from numba.core.registry import cpu_target

    from deltaprop import __version__

    triple, cpu_name, features = cpu_target.target_context.codegen().magic_tuple()
    sources = [(path.relative_to(KERNELS).as_posix(), path.read_bytes()) for path in sorted(KERNELS.rglob("*.py"))]
    digest = _digest(triple, features, *(part for source in sources for part in source))
    return (f"{KEY_PREFIX}{__version__}_numba-{numba.__version__}_{sys.implementation.cache_tag}_"
            f"{cpu_name}-{digest}")


def cache_location() -> CacheLocation:
    """Where this process caches its kernels (see the module's docstring for the rules)."""
    if os.environ.get(ENV):
        root = Path(os.environ[ENV]).expanduser()
        return CacheLocation(root / cache_key(), ENV, root)
    from numba.core import config

    if config.CACHE_DIR:
        from numba.core.caching import _CacheLocator

        path = Path(config.CACHE_DIR) / _CacheLocator.get_suitable_cache_subpath(str(CPU_SOURCES / "__init__.py"))
        return CacheLocation(path, "NUMBA_CACHE_DIR", path)
    root = user_cache_root()
    return CacheLocation(root / cache_key(), "per-user default", root)


def cache_dir() -> Path:
    """The folder that this process's CPU kernels load from and save to (it may not exist yet)."""
    return cache_location().path


@functools.cache
def writable_cache_dir() -> Path | None:
    """``cache_dir()``, made and checked once per process; None, with one KernelCacheWarning, when it
    cannot be written (a read-only folder, a path through a file): kernels then compile in memory."""
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        warnings.warn(f"deltaprop: cannot write the kernel cache at {path} ({e.strerror or e}): kernels compile in "
                      f"memory, again in every new process; set {ENV} to a writable folder",
                      KernelCacheWarning, stacklevel=2)
        return None
    _install_locator()
    return path


def enable(dispatcher):
    """Turns on disk caching in ``cache_dir()`` for ``dispatcher``, a Numba dispatcher of a function
    defined in deltaprop's CPU kernel sources, unless the folder cannot be written; returns it."""
    if writable_cache_dir() is not None:
        dispatcher.enable_caching()
    return dispatcher


@functools.cache
def _install_locator() -> None:
    """Puts ``KernelCacheLocator`` first among Numba's cache locators. It answers for the files of
    ``CPU_SOURCES`` only, so that no other library's cache moves, and none of deltaprop's lands in the
    package (Numba's next choice, a ``__pycache__`` beside the sources)."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # older Numba: with a leading underscore
    provided = getattr(caching, "UserProvidedCacheLocator", None) or caching._UserProvidedCacheLocator

    class KernelCacheLocator(provided):
        """Numba's locator of a user-given folder, pointed at ``writable_cache_dir()``."""

        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = str(writable_cache_dir())

        @classmethod
        def from_function(cls, py_func, py_file):
            if Path(py_file).resolve().parent != CPU_SOURCES:
                return None  # not ours: the next locator decides
            return cls(py_func, py_file)

    impl._locator_classes.insert(0, KernelCacheLocator)


def _folders(location: CacheLocation) -> list[Path]:
    """The folders that hold deltaprop's kernel caches: the keyed ones under the root, or the one folder."""
    if location.root == location.path:
        return [location.path] if location.path.is_dir() else []
    if not location.root.is_dir():
        return []
    return sorted(p for p in location.root.iterdir() if p.is_dir() and p.name.startswith(KEY_PREFIX))


def _cache_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and (p.suffix in CACHE_SUFFIXES or ".tmp." in p.name)]


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in _cache_files(folder)) if folder.is_dir() else 0


def _kernel_name(index_file: Path) -> str:
    """The function of an index file: "step.build_sgd_step.locals.sgd_step_float32_...-283.py311.nbi" ->
    "sgd_step_float32_...", "step.small_dense-55.py311.nbi" -> "small_dense"."""
    function = index_file.name.rsplit("-", 1)[0]  # module.qualname, "<" and ">" dropped by Numba
    return function.rsplit(".locals.", 1)[1] if ".locals." in function else function.split(".", 1)[-1]


def cache_entries(folder: Path | None = None) -> list[CacheEntry]:
    """One entry per kernel cached in ``folder`` (default ``cache_dir()``), by kernel name."""
    folder = cache_dir() if folder is None else folder
    if not folder.is_dir():
        return []
    files = _cache_files(folder)
    entries = []
    for index in sorted(p for p in files if p.suffix == ".nbi"):
        stem = index.name[:-len(".nbi")]
        data = [p for p in files if p.suffix == ".nbc" and p.name.startswith(stem + ".")]
        entries.append(CacheEntry(_kernel_name(index), len(data), sum(p.stat().st_size for p in [index, *data])))
    return entries


def stale_folders() -> list[Path]:
    """deltaprop's keyed cache folders beside the current one: other versions, CPUs or sources (never loaded)."""
    location = cache_location()
    return [folder for folder in _folders(location) if folder != location.path]


def describe() -> dict:
    """What `deltaprop info` and `deltaprop cache` print: the folder, why it is there, what it holds, and the
    stale folders beside it."""
    location = cache_location()
    entries, stale = cache_entries(location.path), stale_folders()
    return {"path": str(location.path), "origin": location.origin, "kernels": len(entries),
            "versions": sum(e.versions for e in entries), "bytes": folder_size(location.path),
            "stale_folders": len(stale), "stale_bytes": sum(folder_size(f) for f in stale)}


def clear_cache() -> tuple[int, int]:
    """Removes the kernel caches of deltaprop (the current folder and the stale ones beside it; only Numba's
    cache files, and the folders left empty); returns (files removed, bytes freed). Kernels already
    loaded in this process keep running; the next process compiles them again."""
    removed, freed = 0, 0
    location = cache_location()
    for folder in _folders(location):
        for path in _cache_files(folder):
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            removed, freed = removed + 1, freed + size
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: something else lives there too
    return removed, freed
