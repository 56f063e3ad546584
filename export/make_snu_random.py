"""Write an SNU weights folder (DESIGN §5, PET-guided preprocessing + PSAM U-Net) with small random weights,
through the torch route of export/to_onnx.py, exactly as a trained SNU network would be exported.

    .venv/bin/python export/make_snu_random.py --out weights/snu-random [--seed 0] [--folds 1]

The recipe: ROI brain_peak_head_crop (SNU's localisation and brain-peak cut: 256×256 mm in-plane, 112 slices of
3 mm), one 256×256×112 window at 1×1×3 mm (export/specs/snu.json: CT B-spline, clip [-1000, 1000] HU, ×0.001,
sigmoid; PET linear, z-score over the whole crop, sigmoid), SNUNet (PSAM + SE Norm U-Net) with tiny widths so a
window takes seconds on a CPU, and "restore": "paste_nearest" (argmax on the model grid, nearest neighbour to the
CT). Random weights segment nothing meaningful: the folder exercises the SNU recipe end to end, nothing more.
For trained weights, run the command `torch_route_argv` builds with your state dicts and --kwargs.
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

from hnseg_export.snu import SNUNet  # noqa: E402
from hnseg_infer.errors import ExportError  # noqa: E402

SPEC = Path(__file__).resolve().parent / "specs" / "snu.json"
MODULE = "hnseg_export.snu:SNUNet"
# SNU's localisation and brain-peak cut (the method's defaults, written out)
ROI = {"method": "brain_peak_head_crop",
       "params": {"uptake_threshold_suv": 0.5, "slab_slices": 20, "window_xy_mm": 256.0, "n_slices": 112,
                  "slice_mm": 3.0, "top_mean_threshold": 0.1, "peak_index_max": 50}}
# depth 5 as the paper's input needs (112 = 7·2^4), widths small enough for seconds per window on a CPU
TINY_KWARGS = {"in_channels": 2, "n_classes": 3, "pet_channel": 1, "base_features": 2, "depth": 5, "max_features": 8,
               "attention_features": 2, "blocks_per_level": 1}


def torch_route_argv(state_dicts: list[Path], out: Path, *, kwargs: dict, name: str = "snu") -> list[str]:
    """export/to_onnx.py's arguments for an SNUNet with the SNU recipe."""
    return ["torch", "--module", MODULE, "--kwargs", json.dumps(kwargs), "--model-spec", str(SPEC),
            "--roi", json.dumps(ROI), "--restore", "paste_nearest", "--name", name, "--out", str(out),
            "--state-dict", *map(str, state_dicts)]


def make(out: Path, *, seed: int = 0, folds: int = 1, overwrite: bool = False) -> Path:
    """Random-weight SNUNet folds (seed + fold) exported to `out`; ExportError if the route fails."""
    with tempfile.TemporaryDirectory() as tmp:
        state_dicts = []
        for fold in range(folds):
            torch.manual_seed(seed + fold)
            state_dicts.append(Path(tmp) / f"snu_fold{fold}.pt")
            torch.save(SNUNet(**TINY_KWARGS).state_dict(), state_dicts[-1])
        argv = torch_route_argv(state_dicts, out, kwargs=TINY_KWARGS, name="snu-random")
        if to_onnx.main(argv + (["--overwrite"] if overwrite else [])) != 0:
            raise ExportError(f"the torch route failed for {out} (its message is above)")
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "weights" / "snu-random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    make(args.out, seed=args.seed, folds=args.folds, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
