"""The leaf helpers every stage uses for files: the one atomic writer, and file hashes.

`write_atomic` writes through a temporary `.partial-*` file in the target folder, then renames it over the target:
a reader sees the old file or the whole new one, never half of one; on an error the temporary file, and any folder
made for it, are removed. Files get the mode a plain `open` would give them (0666 less the umask: 0644 by default;
mkstemp's 0600 would hide a mask from other users). `clear_previous` removes what an earlier run left, so a
failed run never leaves a stale result that looks like its own.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hnseg_infer.errors import OutputError

PARTIAL_PREFIX = ".partial-"


def file_mode() -> int:
    """0666 less the process umask: read from /proc (Linux), else by setting it and back (no getter in Python)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


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
        fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix="".join(path.suffixes), dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}; {hint}") from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
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


def check_writable_folder(path: Path, what: str) -> None:
    """The folder of `path` exists or can be made, and this user may write in it; OutputError naming the fix."""
    existing = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot write {what} {path}: {existing} is a file, not a folder; pass a folder there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: this user (uid {os.getuid()}) may not write in {existing}; "
                          f"make it writable, or run as its owner")


def clear_previous(path: Path) -> list[str]:
    """Remove an earlier run's `path` and the `.partial-*` files a killed run left beside it; the names removed."""
    folder = path.parent
    if not folder.is_dir():
        return []
    removed = []
    for stale in [path, *sorted(folder.glob(PARTIAL_PREFIX + "*"))]:
        if stale.is_file() or stale.is_symlink():
            try:
                stale.unlink()
            except OSError as exc:
                raise OutputError(f"cannot remove {stale}, left by an earlier run ({exc.strerror}): make {folder} "
                                  f"writable") from exc
            removed.append(stale.name)
    return removed
