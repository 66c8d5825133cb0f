"""Private data files: what the gateway records about its calls is readable by its own user only.

Telemetry (the SQLite store and its WAL, JSONL sinks and exports), the argument-hash salt and the
optimizer's rules are created with mode 0600 in folders created 0700, whatever the process umask
(issue 10: telemetry files were world-readable). A file an older version left readable by others
is narrowed to 0600 when opened. SQLite creates its `-wal` / `-shm` files with the mode of the
database file (SQLite's unix VFS, `findCreateFileMode`), so creating the database 0600 first
covers them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import IO

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """Create `path` and any missing parents with mode 0700 (existing folders are left as they are).

    Raises:
        OSError: a folder cannot be created.
    """
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            folder.mkdir(mode=DIR_MODE)
        with contextlib.suppress(OSError):
            os.chmod(folder, DIR_MODE)  # mkdir's mode is masked by the umask
    return path


def _narrow(fd: int) -> None:
    """Drop group/other bits from an open file we own (files created by older versions)."""
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, FILE_MODE)


def ensure_private_file(path: str | Path) -> Path:
    """Create `path` empty with mode 0600 if it does not exist (its folder 0700); narrow it if it does.

    For files another library opens by name (SQLite): it then keeps the mode it finds.

    Raises:
        OSError: the file cannot be created.
    """
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    try:
        _narrow(fd)
    finally:
        os.close(fd)
    return path


def open_private(path: str | Path, mode: str = "ab") -> IO[bytes]:
    """Open `path` for binary writing (`"ab"` append or `"wb"` truncate), created 0600 in a 0700 folder.

    Raises:
        ValueError: `mode` is not `"ab"` or `"wb"`.
        OSError: the file cannot be opened.
    """
    flags = {"ab": os.O_APPEND, "wb": os.O_TRUNC}.get(mode)
    if flags is None:
        raise ValueError(f"open_private: mode must be 'ab' or 'wb' (got {mode!r})")
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, FILE_MODE)
    _narrow(fd)
    return os.fdopen(fd, mode)
