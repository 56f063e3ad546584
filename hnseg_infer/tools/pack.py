"""The grand-challenge model tarball (`hnseg pack-model`).

Grand-challenge extracts an algorithm's model tarball into /opt/ml/model, where process.py looks first. The tarball
holds recipe.json at its root and every file the recipe names (fold models, stochastic twins, harmonisation
references), each under its path relative to recipe.json, the budget's calibration.json when there is one, and
nothing else. Each file's bytes are hashed as they go
into the tarball and must equal the sha256 the recipe was loaded (and validated) with, so the tarball holds exactly
the model that was checked. Symbolic links and files outside the weights folder are refused: the tarball must not
depend on what lies beside the folder.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from hnseg_infer.errors import RecipeError
from hnseg_infer.inference.calibration import CALIBRATION_FILE
from hnseg_infer.io.atomic import file_sha256, write_atomic
from hnseg_infer.recipe.load import load_recipe, resolve_weights
from hnseg_infer.recipe.spec import Recipe, spectrum_references

MEMBER_MODE = 0o644


@dataclass(frozen=True)
class Member:
    path: Path
    name: str  # inside the tarball: the path relative to recipe.json, POSIX separators
    sha256: str  # as the recipe was loaded


@dataclass(frozen=True)
class Packed:
    out: Path
    members: tuple[Member, ...]
    unpacked_bytes: int
    packed_bytes: int


def named_files(recipe: Recipe) -> list[tuple[Path, str]]:
    """recipe.json, then each model's files, stochastic twins and references, with their load-time sha256; once
    each (two models may share a reference); and the budget's calibration.json when there is one."""
    files = [(recipe.path, recipe.sha256)]
    if (calibration := recipe.path.parent / CALIBRATION_FILE).is_file():
        files.append((calibration, file_sha256(calibration)))
    for model in recipe.models:
        files += zip(model.files, model.sha256)
        files += zip(model.stochastic_files, model.stochastic_sha256)
        files += [(ref.path, ref.sha256) for ref in spectrum_references(model)]
    seen, unique = set(), []
    for path, sha in files:
        key = os.path.normpath(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append((path, sha))
    return unique


def member_name(path: Path, folder: Path, recipe_path: Path) -> str:
    """`path` relative to `folder`; RecipeError when it lies outside or passes through a symbolic link."""
    relative = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder)))
    if relative.parts[0] == os.pardir:
        raise RecipeError(f"{recipe_path} names {path}, outside the weights folder {folder}: copy the file into "
                          f"the folder and name it relative to recipe.json")
    step = Path(folder)
    for part in relative.parts:
        step = step / part
        if step.is_symlink():
            raise RecipeError(f"{step} is a symbolic link (to {os.readlink(step)}): replace it by the file itself "
                              f"(cp --dereference) so that the tarball holds what the recipe names")
    return relative.as_posix()


class _HashingReader:
    """A file object that hashes what tarfile reads from it."""

    def __init__(self, f):
        self._f, self.digest = f, hashlib.sha256()

    def read(self, n=-1) -> bytes:
        data = self._f.read(n)
        self.digest.update(data)
        return data


def _add(tar: tarfile.TarFile, member: Member) -> None:
    info = tarfile.TarInfo(member.name)
    info.size = member.path.stat().st_size
    info.mode, info.mtime = MEMBER_MODE, int(member.path.stat().st_mtime)  # owner root:root, as tarfile's default
    with open(member.path, "rb") as f:
        reader = _HashingReader(f)
        tar.addfile(info, reader)
    if reader.digest.hexdigest() != member.sha256:
        raise RecipeError(f"{member.path} changed after the recipe was loaded (sha256 {reader.digest.hexdigest()} "
                          f"now, {member.sha256} then): re-export the model, or stop what is writing the file, and "
                          f"pack again")


def pack_recipe(recipe: Recipe, out: Path) -> Packed:
    """Write the tarball of a loaded recipe to `out` (gzip), atomically; nothing is written on an error."""
    folder = recipe.path.parent
    members = tuple(Member(Path(path), member_name(Path(path), folder, recipe.path), sha)
                    for path, sha in named_files(recipe))

    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for member in members:
                _add(tar, member)

    write_atomic(Path(out), write, hint="check that the folder of --out is writable and has space")
    return Packed(Path(out), members, sum(m.path.stat().st_size for m in members), Path(out).stat().st_size)


def pack_model(weights_dir: Path, out: Path) -> Packed:
    """Load (and so validate and hash) the recipe of `weights_dir`, then pack it."""
    return pack_recipe(load_recipe(resolve_weights(weights_dir)), out)
