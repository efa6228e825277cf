"""Atomic file writes: a result is either the old file or the complete new one, never half-written.

Every writer in the package goes through :func:`atomic_path`: write to a unique temporary file in the target's
directory, then ``os.replace`` it over the target (atomic on POSIX within one file system); on any error the
temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the block succeeds it replaces ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> Path:
    """``obj`` as JSON (non-JSON values via ``str``), newline-terminated."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=str) + "\n")
