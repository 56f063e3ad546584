"""The leaf helpers every stage uses for files: the one atomic writer, and file hashes.

`write_atomic` writes through a temporary `.partial-*` file in the target folder, then renames it over the target:
a reader sees the old file or the whole new one, never half of one; on an error the temporary file, and any folder
made for it, are removed. Files are made readable by everyone (mkstemp's 0600 would hide a mask from other users).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hnseg_infer.errors import OutputError

FILE_MODE = 0o644


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[str], None], *, hint: str = "check that the folder is writable") -> Path:
    """Call `write(temporary_path)` and rename the result to `path`. OutputError, naming `path` and `hint`, when
    the folder cannot be made or the file cannot be written; nothing is left behind."""
    path = Path(path)
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix="".join(path.suffixes), dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}; {hint}") from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as exc:  # RuntimeError: ITK's writers
        _clean(tmp, created)
        raise OutputError(f"cannot write {path}: {exc}; {hint}") from exc
    except BaseException:
        _clean(tmp, created)
        raise
    return path


def write_bytes_atomic(path: Path, data: bytes, **kwargs) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), **kwargs)


def _clean(tmp: str, created: list[Path]) -> None:
    Path(tmp).unlink(missing_ok=True)
    for folder in created:  # deepest first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
