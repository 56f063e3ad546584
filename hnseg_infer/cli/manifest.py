"""The cohort manifest: one CSV row per case, rewritten atomically after every case, and what resume reads.

A row says what ran on what: the case, its status (`ok`, `failed`, `skipped`), the one-line error, the input paths
and their sha256, the recipe's sha256, seconds, peak memory, the worker, the label volumes, and with a reference
the per-case metrics (tools/metrics.py's columns). A reader sees the previous manifest or the new one, never half
of one: an interrupted run leaves the rows of the cases it finished.
"""

from __future__ import annotations

import csv
import hashlib
from io import StringIO
from pathlib import Path

from hnseg_infer.errors import InputError
from hnseg_infer.io.atomic import file_sha256, write_bytes_atomic
from hnseg_infer.io.sources import CaseSource
from hnseg_infer.recipe.spec import Recipe, spectrum_references

MANIFEST_FILE = "manifest.csv"
COLUMNS = ["case", "status", "error", "ct", "pet", "reference", "ct_sha256", "pet_sha256", "recipe_sha256",
           "seconds", "peak_memory_mib", "worker", "attempts", "gtvp_ml", "gtvn_ml", "gtvp_components",
           "gtvn_components"]
DONE = ("ok", "skipped")  # statuses whose mask a re-run keeps


def recipe_sha256(recipe: Recipe) -> str:
    """One hash for what decides the masks: recipe.json and every file it names (models, stochastic twins,
    harmonisation references: their sha256)."""
    parts = [recipe.sha256] + [h for model in recipe.models for h in (
        *model.sha256, *model.stochastic_sha256, *(ref.sha256 for ref in spectrum_references(model)))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def input_sha256(case: CaseSource) -> dict[str, str]:
    return {"ct_sha256": path_sha256(case.ct), "pet_sha256": path_sha256(case.pet) if case.pet else ""}


def path_sha256(path: Path) -> str:
    """An image file's sha256, or a DICOM series folder's: over its files' names and contents, in name order."""
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{file.name}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


class Manifest:
    """The rows of DIR/manifest.csv by case, in the order they were first recorded."""

    def __init__(self, path: Path, rows: dict[str, dict] | None = None):
        self.path, self.rows = Path(path), rows or {}
        self._extra = dict.fromkeys(k for row in self.rows.values() for k in row if k not in COLUMNS)
        self._fields: list[str] = []
        self._lines: dict[str, str] = {}  # each row's CSV line, rendered once: a rewrite stays cheap at 1000s of rows

    @classmethod
    def open(cls, path: Path) -> Manifest:
        """The manifest at `path` (empty when there is none yet); InputError when it is not one."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"manifest {path} cannot be read ({exc}): remove it, or pass --force") from exc
        if rows and not {"case", "status", "ct_sha256", "recipe_sha256"} <= set(rows[0]):
            raise InputError(f"{path} is not an hnseg manifest (columns {list(rows[0])}): choose another --out")
        return cls(path, {row["case"]: row for row in rows})

    def put(self, row: dict) -> None:
        """Add or replace the case's row (written with the next `write`)."""
        self.rows[row["case"]] = row
        self._lines.pop(row["case"], None)
        self._extra.update((k, None) for k in row if k not in self._extra and k not in COLUMNS)

    def record(self, row: dict) -> None:
        """Add or replace the case's row and rewrite the file."""
        self.put(row)
        self.write()

    def write(self) -> None:
        fields = COLUMNS + list(self._extra)
        if fields != self._fields:  # a new column: every line again
            self._fields, self._lines = fields, {}
        lines = [self._lines.get(case) or self._render(case, row) for case, row in self.rows.items()]
        text = _csv_line(fields) + "".join(lines)
        write_bytes_atomic(self.path, text.encode(), hint="pass an --out folder you can write")

    def _render(self, case: str, row: dict) -> str:
        self._lines[case] = line = _csv_line([_cell(row.get(k)) for k in self._fields])
        return line

    def reusable(self, case: CaseSource, *, recipe_sha: str, mask: Path) -> dict | None:
        """The previous row when this case need not run again: it finished (ok/skipped) with this recipe, its mask
        is there, and its inputs have the same sha256 (hashed again now). None: run it."""
        row = self.rows.get(case.case)
        if row is None or row["status"] not in DONE or row["recipe_sha256"] != recipe_sha or not mask.is_file():
            return None
        if (row["ct"], row["pet"]) != (str(case.ct), str(case.pet or "")):
            return None
        return row if {k: row[k] for k in ("ct_sha256", "pet_sha256")} == input_sha256(case) else None


def _csv_line(values: list[str]) -> str:
    text = StringIO()
    csv.writer(text, lineterminator="\n").writerow(values)
    return text.getvalue()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def failed_row(case: CaseSource, error: str, *, recipe_sha: str, worker: str = "", attempts: int = 1,
               seconds: float | None = None) -> dict:
    """The row of a case that did not finish (its input hashes are left empty when they were never taken)."""
    return {"case": case.case, "status": "failed", "error": error, "ct": str(case.ct), "pet": str(case.pet or ""),
            "reference": str(case.reference or ""), "recipe_sha256": recipe_sha, "worker": worker,
            "attempts": attempts, "seconds": seconds}
