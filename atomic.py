"""The one atomic file write of deltaprop: a reader of ``path`` sees the old file or the new one, never a part.

``write_atomic(path, write)`` calls ``write(file)`` on a temporary file in the target's directory, named
``.deltaprop-<target name>.<pid>.<random>.tmp``; flushes it and fsyncs it; renames it over the target
(``os.replace``, atomic on POSIX and Windows within one file system); then fsyncs the directory so
that the rename itself survives a power cut. On any error (or KeyboardInterrupt) the temporary file is
removed and the target is left as it was. A process killed mid-write leaves its temporary file behind:
the next write to the same target removes such orphans first (those of processes no longer running,
so that two processes writing the same target at once do not remove each other's file).
"""

from __future__ import annotations

import glob
import os
import tempfile

_PREFIX = ".deltaprop-"
_SUFFIX = ".tmp"


def _orphans(directory, name):
    """The temporary files of earlier writes to ``directory/name`` whose process has ended."""
    pattern = os.path.join(glob.escape(directory), glob.escape(f"{_PREFIX}{name}.") + "*" + _SUFFIX)
    for candidate in glob.glob(pattern):
        pid = os.path.basename(candidate)[len(_PREFIX) + len(name) + 1:].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            yield candidate


def _running(pid) -> bool:
    """Whether process ``pid`` exists; True when that cannot be told (where signal 0 is not a probe)."""
    if pid == os.getpid():
        return True  # this process removes its own temporary files itself
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to another user
    return True


def _fsync_directory(directory):
    """Makes a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(handle)


def write_atomic(path, write, argument="path") -> None:
    """Replaces the file at ``path`` with what ``write(file)`` writes to a binary file object, atomically.

    The directory of ``path`` must exist (else FileNotFoundError naming ``argument``, nothing written). Temporary files left by earlier interrupted writes to the same
    ``path`` are removed first.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory) or os.path.isdir(path):
        problem = "is a directory" if os.path.isdir(path) else f"{os.path.dirname(path)!r} does not exist"
        raise FileNotFoundError(f"{argument}: expected a file path in an existing directory, got {path!r} ({problem})")
    for orphan in _orphans(directory, name):
        try:
            os.unlink(orphan)
        except FileNotFoundError:
            pass  # another writer removed it
    handle, temporary = tempfile.mkstemp(prefix=f"{_PREFIX}{name}.{os.getpid()}.", suffix=_SUFFIX, dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
