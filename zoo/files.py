"""Writing files so that an interrupted write never leaves a half-written one: every run file, checkpoint and codec.

A file is written to a temporary file beside its destination, flushed to disk and renamed over the destination,
which is atomic on POSIX file systems: readers see the old file or the new one, never a mix. The result gets the
permissions a plain `open(path, 'w')` would give (0666 minus the umask); the temporary file's private 0600 does
not leak into run folders that others read.
"""
import os
import tempfile
from pathlib import Path

__all__ = ['atomic_write_bytes', 'default_file_mode']


def default_file_mode() -> int:
    """0o666 without the bits of the process's umask (read without changing it for other threads)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), default_file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
