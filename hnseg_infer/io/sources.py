"""Cohort sources: which cases a folder or CSV holds, as paths (nothing is read here).

Four layouts are recognised; anything else, or a folder that looks like two of them, is an InputError naming the
files that decided it, before any case runs:

- `gc`: grand-challenge cases, `SOURCE/CASE/[input/]images/{ct,pet}/*` (`hnseg phantom`'s layout; a phantom's
  `CASE/reference/*.mha` is used as the reference when it holds exactly one mask);
- `hecktor`: the HECKTOR 2025 release, `SOURCE/imagesTr/CENTRE-ID__CT.nii.gz` and `…__PT.nii.gz` (also `imagesTs/`,
  or the files directly in SOURCE), references `SOURCE/labelsTr/CENTRE-ID.nii.gz` when present;
- `nnunet`: nnU-Net v2 raw, `SOURCE/dataset.json` with `SOURCE/imagesTs/CASE_0000.nii.gz` … (`imagesTr/` with
  `labelsTr/` when there is no imagesTs); which channel is CT and which PET comes from dataset.json's channel_names;
- `csv`: a CSV file with the columns `case,ct,pet[,reference]` (paths relative to the CSV's folder; an empty pet is
  a CT-only case).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hnseg_infer.errors import InputError
from hnseg_infer.io.images import IMAGE_SUFFIXES, is_dicom_folder, is_image_file

MAX_NAMES_SHOWN = 5
CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a case name is also a file name in the outputs
HECKTOR_SUFFIXES = {"ct": "__CT.nii.gz", "pet": "__PT.nii.gz"}
NNUNET_CHANNEL_NAMES = {"ct": ("ct",), "pet": ("pet", "pt", "fdg-pet", "fdg_pet", "suv")}


@dataclass(frozen=True)
class CaseSource:
    """One case: its name (unique in the cohort, safe as a file name), CT, PET (None: CT-only) and reference."""

    case: str
    ct: Path
    pet: Path | None
    reference: Path | None = None


@dataclass(frozen=True)
class Source:
    """The cases of a cohort and the layout they were found in."""

    layout: str
    root: Path
    cases: tuple[CaseSource, ...]

    def describe(self) -> str:
        refs = sum(c.reference is not None for c in self.cases)
        no_pet = sum(c.pet is None for c in self.cases)
        return (f"{len(self.cases)} cases in {self.root} ({self.layout} layout"
                + (f", {refs} with references" if refs else "") + (f", {no_pet} without PET" if no_pet else "") + ")")


def names(paths, *, limit: int = MAX_NAMES_SHOWN) -> str:
    items = [str(p) for p in paths]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def find_cases(source: Path) -> Source:
    """The cases of SOURCE (a folder in one of the layouts, or a CSV file); InputError when it is none of them,
    ambiguous, or incomplete."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _checked(Source("csv", source, _csv_cases(source)))
    if not source.is_dir():
        raise InputError(f"cohort source {source} is neither a folder nor a .csv file: pass a folder of cases "
                         f"(grand-challenge, HECKTOR 2025 or nnU-Net raw layout) or a CSV case,ct,pet[,reference]")
    evidence = {layout: found for layout, found in
                (("gc", _gc_evidence(source)), ("hecktor", _hecktor_evidence(source)),
                 ("nnunet", _nnunet_evidence(source))) if found}
    if not evidence:
        raise InputError(f"cohort source {source} holds no cases in a known layout: expected CASE/[input/]images/"
                         f"{{ct,pet}}/* folders, imagesTr/ID__CT.nii.gz + ID__PT.nii.gz (HECKTOR 2025), "
                         f"dataset.json + imagesTs/ (nnU-Net raw), or pass a CSV case,ct,pet[,reference]")
    if len(evidence) > 1:
        raise InputError(f"cohort source {source} is ambiguous: it looks like "
                         + " and like ".join(f"the {layout} layout ({names(found, limit=2)})"
                                             for layout, found in evidence.items())
                         + ": move the other files away or list the cases in a CSV")
    layout = next(iter(evidence))
    cases = {"gc": _gc_cases, "hecktor": _hecktor_cases, "nnunet": _nnunet_cases}[layout](source)
    return _checked(Source(layout, source, tuple(cases)))


def _checked(source: Source) -> Source:
    if not source.cases:
        raise InputError(f"cohort source {source.root} holds no cases")
    bad = [c.case for c in source.cases if not CASE_NAME.match(c.case)]
    if bad:
        raise InputError(f"cohort source {source.root}: case names {names(map(repr, bad))} are not usable as file "
                         f"names (letters, digits, '.', '_', '-'): rename them")
    twice = [case for case, n in Counter(c.case for c in source.cases).items() if n > 1]
    if twice:
        raise InputError(f"cohort source {source.root}: case names {names(sorted(set(twice)))} occur more than once: "
                         f"make them unique")
    missing = [p for c in source.cases for p in (c.ct, c.pet, c.reference) if p is not None and not p.exists()]
    if missing:
        raise InputError(f"cohort source {source.root}: {len(missing)} input file(s) do not exist: {names(missing)}")
    return source


# --- grand-challenge layout ---------------------------------------------------------------------------------


def _gc_root(case_dir: Path) -> Path | None:
    for root in (case_dir / "input", case_dir):
        if (root / "images").is_dir():
            return root
    return None


def _gc_evidence(source: Path) -> list[Path]:
    roots = (_gc_root(d) for d in sorted(source.iterdir()) if d.is_dir())
    return [root / "images" for root in roots if root is not None]


def _images_in(folder: Path) -> list[Path]:
    """The image files in `folder`, or the folder itself when it holds one DICOM series."""
    if is_dicom_folder(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def _gc_cases(source: Path) -> list[CaseSource]:
    """Every sub-folder is a case; a folder without images/ct holding exactly one image (or with two PETs) is an
    error naming it. A missing or empty images/pet is a CT-only case."""
    cases, problems = [], []
    for case_dir in sorted(d for d in source.iterdir() if d.is_dir() and not d.name.startswith(".")):
        root = _gc_root(case_dir)
        if root is None:
            problems.append(f"{case_dir} (no images/ folder)")
            continue
        cts, pets = _images_in(root / "images" / "ct"), _images_in(root / "images" / "pet")
        if len(cts) != 1:
            problems.append(f"{root / 'images' / 'ct'} ({len(cts)} CT images, expected 1)")
        if len(pets) > 1:
            problems.append(f"{root / 'images' / 'pet'} ({len(pets)} PET images, expected 1)")
        if len(cts) == 1 and len(pets) <= 1:
            refs = _images_in(case_dir / "reference")
            cases.append(CaseSource(case_dir.name, cts[0], pets[0] if pets else None,
                                    refs[0] if len(refs) == 1 else None))
    if problems:
        raise InputError(f"cohort source {source} (grand-challenge layout) has incomplete cases: {names(problems)}: "
                         f"each case needs exactly one image in [input/]images/ct and at most one in images/pet")
    return cases


# --- HECKTOR 2025 release -----------------------------------------------------------------------------------


def _hecktor_folders(source: Path) -> list[Path]:
    return [f for f in (source / "imagesTr", source / "imagesTs", source) if f.is_dir()]


def _hecktor_evidence(source: Path) -> list[Path]:
    return [p for f in _hecktor_folders(source) for p in sorted(f.iterdir())
            if p.name.endswith(tuple(HECKTOR_SUFFIXES.values())) and p.is_file()]


def _hecktor_cases(source: Path) -> list[CaseSource]:
    """CENTRE-ID__CT.nii.gz with CENTRE-ID__PT.nii.gz beside it; other modalities (RTDOSE …) are ignored."""
    files: dict[str, dict[str, Path]] = {}
    for path in _hecktor_evidence(source):
        role = next(r for r, s in HECKTOR_SUFFIXES.items() if path.name.endswith(s))
        case = path.name[:-len(HECKTOR_SUFFIXES[role])]
        if role in files.setdefault(case, {}):
            raise InputError(f"cohort source {source} (HECKTOR layout) holds case {case} twice: "
                             f"{files[case][role]} and {path}: keep one")
        files[case][role] = path
    lone = [next(iter(f.values())) for f in files.values() if len(f) == 1]
    if lone:
        raise InputError(f"cohort source {source} (HECKTOR layout): {names(lone)} have no partner (each case needs "
                         f"CASE__CT.nii.gz and CASE__PT.nii.gz in the same folder)")
    labels = source / "labelsTr"
    return [CaseSource(case, f["ct"], f["pet"], _label(labels, case, ".nii.gz")) for case, f in sorted(files.items())]


def _label(folder: Path, case: str, ending: str) -> Path | None:
    path = folder / f"{case}{ending}"
    return path if path.is_file() else None


# --- nnU-Net raw --------------------------------------------------------------------------------------------


def _nnunet_evidence(source: Path) -> list[Path]:
    dataset = source / "dataset.json"
    return [dataset] if dataset.is_file() and any((source / f).is_dir() for f in ("imagesTs", "imagesTr")) else []


def nnunet_channels(dataset_json: Path) -> tuple[dict[str, int], str]:
    """({"ct": index, "pet": index}, file ending) from dataset.json's channel_names (names matched ignoring case)."""
    try:
        dataset = json.loads(dataset_json.read_text())
        channel_names = {int(k): str(v).strip().lower() for k, v in dataset["channel_names"].items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise InputError(f"{dataset_json} has no readable channel_names ({type(exc).__name__}: {exc}): expected "
                         f'{{"channel_names": {{"0": "CT", "1": "PET"}}, "file_ending": ".nii.gz"}}') from exc
    channels = {}
    for role, accepted in NNUNET_CHANNEL_NAMES.items():
        found = [i for i, name in channel_names.items() if name in accepted]
        if len(found) != 1:
            raise InputError(f"{dataset_json}: channel_names {dataset['channel_names']} name {len(found)} "
                             f"{role.upper()} channels (accepted names: {', '.join(accepted)}): expected exactly one")
        channels[role] = found[0]
    ending = dataset.get("file_ending", ".nii.gz")
    if ending not in IMAGE_SUFFIXES:
        raise InputError(f"{dataset_json}: file_ending {ending!r} is not one of {', '.join(IMAGE_SUFFIXES)}")
    return channels, ending


def _nnunet_cases(source: Path) -> list[CaseSource]:
    """CASE_XXXX files of imagesTs (or of imagesTr, with labelsTr/CASE as references); every case needs every
    channel dataset.json names."""
    channels, ending = nnunet_channels(source / "dataset.json")
    folder = source / "imagesTs" if (source / "imagesTs").is_dir() else source / "imagesTr"
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    files: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_file():
            files.setdefault(match[1], {})[int(match[2])] = path
    wanted = sorted(channels.values())
    incomplete = [f"{case} (has channels {sorted(f)}, needs {wanted})" for case, f in sorted(files.items())
                  if not set(wanted) <= set(f)]
    if incomplete:
        raise InputError(f"cohort source {source} (nnU-Net raw layout): incomplete cases in {folder}: "
                         f"{names(incomplete)}: every case needs CASE_{wanted[0]:04d}{ending} … as dataset.json says")
    labels = source / "labelsTr" if folder.name == "imagesTr" else None
    return [CaseSource(case, f[channels["ct"]], f[channels["pet"]],
                       _label(labels, case, ending) if labels else None) for case, f in sorted(files.items())]


# --- CSV ----------------------------------------------------------------------------------------------------


def _csv_cases(path: Path) -> tuple[CaseSource, ...]:
    """Rows case,ct,pet[,reference]; relative paths are relative to the CSV's folder."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cohort CSV {path} cannot be read ({exc})") from exc
    if not {"case", "ct", "pet"} <= set(header):
        raise InputError(f"cohort CSV {path} has columns {list(header)}: expected a header case,ct,pet[,reference]")

    def resolve(value: str | None) -> Path | None:
        value = (value or "").strip()
        return None if not value else (Path(value) if Path(value).is_absolute() else path.parent / value)

    blank = [str(i + 2) for i, r in enumerate(rows) if not (r["case"] or "").strip() or not (r["ct"] or "").strip()]
    if blank:
        raise InputError(f"cohort CSV {path}: rows {names(blank)} have no case name or no CT: fill them in")
    return tuple(CaseSource(r["case"].strip(), resolve(r["ct"]), resolve(r["pet"]), resolve(r.get("reference")))
                 for r in rows)


# --- references from elsewhere ------------------------------------------------------------------------------


def with_references(source: Source, folder: Path) -> Source:
    """The source with each case's reference taken from FOLDER/CASE.<image suffix> (`--references`); every case
    needs one (a partial set would make the HECKTOR figures a subset's); extra masks in FOLDER are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"references folder {folder} does not exist: pass a folder of masks named CASE.nii.gz/.mha")
    by_case = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in IMAGE_SUFFIXES if path.name.endswith(s)), None)
        if suffix and is_image_file(path):
            by_case.setdefault(path.name[:-len(suffix)], []).append(path)
    twice = [paths for paths in by_case.values() if len(paths) > 1]
    if twice:
        raise InputError(f"references folder {folder} holds two masks for one case ({names(twice[0])}): keep one")
    missing = [c.case for c in source.cases if c.case not in by_case]
    if missing:
        raise InputError(f"references folder {folder} has no mask for cases {names(missing)}: expected "
                         f"{folder}/CASE.nii.gz (or .mha) for every case")
    cases = tuple(CaseSource(c.case, c.ct, c.pet, by_case[c.case][0]) for c in source.cases)
    return Source(source.layout, source.root, cases)
