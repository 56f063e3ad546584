"""Write an HN-UISeg weights folder (DESIGN §5, uncertainty-aware + interactive) with small random weights, through
the torch route of export/to_onnx.py with --uncertainty, exactly as a trained HN-UISeg network would be exported.

    .venv/bin/python export/make_hn_uiseg_random.py --out weights/hn-uiseg-random [--seed 0] [--folds 1]

The recipe: ROI pet_threshold_head_neck_box (200×200×310 mm), 4 channels (export/specs/hn_uiseg.json: CT clipped
to [−1024, 3071] HU, PET as SUV clipped to [0, 50], the GTVp and GTVn click prompts), windows of 224×224×160 with
50 % overlap and Gaussian weighting, a residual-encoder U-Net with dropout in every stage (hnseg_export.uiseg,
tiny widths here), and the uncertainty block: UNCERTAINTY (10 passes, dropout 0.05, noise/flip/rotation ≤ 5°).
Every fold gets a proven stochastic twin; the recipe allows CT-only input (--pet-optional: HN-UISeg is trained with
the PET channel zero-filled too). HN-UISeg runs at the CT's native spacing; a recipe has one spacing per model, so
the spec uses 1×1×3 mm (HECKTOR's CTs are ~0.98 mm in-plane with 1.5–3.3 mm slices); `spacing_xyz_mm` and
`patch_size_zyx` may be given to match other data (the tests use 3 mm and small windows).
Random weights segment nothing meaningful: the folder exercises the recipe end to end, nothing more.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import to_onnx  # noqa: E402  (export/to_onnx.py, the route's command line)

from hnseg_export.uiseg import ResEncUNet  # noqa: E402
from hnseg_infer.errors import ExportError  # noqa: E402

SPEC = Path(__file__).resolve().parent / "specs" / "hn_uiseg.json"
MODULE = "hnseg_export.uiseg:ResEncUNet"
ROI = {"method": "pet_threshold_head_neck_box"}
UNCERTAINTY = {"passes": 10, "dropout_rate": 0.05, "seed": 0,
               "augmentations": {"noise": {"std": 0.05}, "flip": {"axes_zyx": [0, 1, 2]},
                                 "rotation": {"max_degrees": 5}}}
TINY_KWARGS = {"in_channels": 4, "n_classes": 3, "features": [4, 8], "blocks": [1, 1], "dropout": 0.05}


def make(out: Path, *, seed: int = 0, folds: int = 1, overwrite: bool = False, uncertainty: dict = UNCERTAINTY,
         spacing_xyz_mm=None, patch_size_zyx=None, kwargs: dict = TINY_KWARGS) -> Path:
    """Random-weight ResEncUNet folds (seed + fold) exported to `out`; ExportError if the route fails."""
    spec = json.loads(SPEC.read_text())
    if spacing_xyz_mm is not None:
        spec["spacing_xyz_mm"] = list(spacing_xyz_mm)
    if patch_size_zyx is not None:
        spec["patch_size_zyx"] = list(patch_size_zyx)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        state_dicts = []
        for fold in range(folds):
            torch.manual_seed(seed + fold)
            state_dicts.append(Path(tmp) / f"hn_uiseg_fold{fold}.pt")
            torch.save(ResEncUNet(**kwargs).state_dict(), state_dicts[-1])
        argv = ["torch", "--module", MODULE, "--kwargs", json.dumps(kwargs), "--model-spec", str(spec_path),
                "--roi", json.dumps(ROI), "--uncertainty", json.dumps(uncertainty), "--pet-optional",
                "--name", "hn-uiseg-random",
                "--out", str(out), "--state-dict", *map(str, state_dicts)]
        if to_onnx.main(argv + (["--overwrite"] if overwrite else [])) != 0:
            raise ExportError(f"the torch route failed for {out} (its message is above)")
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "weights" / "hn-uiseg-random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    make(args.out, seed=args.seed, folds=args.folds, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
