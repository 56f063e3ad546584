"""Write a BIGS2 weights folder (DESIGN §5, SSIMH + SegResNet) with small random weights, through the torch route
of export/to_onnx.py, exactly as trained BIGS2 folds would be exported.

    .venv/bin/python export/make_bigs2_random.py --out weights/bigs2-random [--seed 0] [--folds 5]
    .venv/bin/python export/make_harmonisation_reference.py REFERENCE_CT.mha --pet REFERENCE_PET.mha \\
        --weights weights/bigs2-random

The recipe: ROI pet_threshold_head_neck_box (the superior head boundary by a PET threshold, the axial centre of
the superior slab, a 200×200×310 mm box), a 1 mm RAS grid as MONAI lays it out (export/specs/bigs2.json: CT
window [-250, 250] HU → [0, 1] → sigmoid; PET z-score over the crop → sigmoid), MONAI SegResNetDS with deep
supervision (dsdepth 2: a list of outputs in training, the full-resolution logits alone in eval mode, which is
what is exported), fold logits averaged before the softmax, 192³ windows placed and blended as MONAI's
sliding_window_inference does (Gaussian; overlap 0.25, its default), small-component removal and the GTVn
distance-to-GTVp prior. The spectrum-swapping CT harmonisation needs a reference subject:
make_harmonisation_reference.py adds it. The CT window, the overlap and the post-processing thresholds are
placeholders: set them to your training's.
Random weights segment nothing meaningful: the folder exercises the BIGS2 recipe end to end, nothing more. For
trained folds, run the command `torch_route_argv` builds with your state dicts and --kwargs.
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

from hnseg_infer.errors import ExportError  # noqa: E402

SPEC = Path(__file__).resolve().parent / "specs" / "bigs2.json"
MODULE = "monai.networks.nets:SegResNetDS"
# BIGS2's PET-threshold anatomy-aware crop (the method's defaults, written out)
ROI = {"method": "pet_threshold_head_neck_box",
       "params": {"threshold_suv": 1.0, "superior_slab_mm": 50.0, "size_mm": [200.0, 200.0, 310.0],
                  "margin_above_mm": 10.0}}
POSTPROCESS = {"min_volume_mm3": {"GTVp": 100.0, "GTVn": 50.0}, "keep_largest_gtvp": False,
               "gtvn_max_distance_to_gtvp_mm": 100.0}
# Deep supervision as trained (two heads), widths small enough for about half a second per 192³ window on a CPU.
TINY_KWARGS = {"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "init_filters": 1, "blocks_down": [0, 1, 1],
               "blocks_up": [0, 0], "dsdepth": 2}


def torch_route_argv(state_dicts: list[Path], out: Path, *, kwargs: dict, name: str = "bigs2") -> list[str]:
    """export/to_onnx.py's arguments for MONAI SegResNetDS folds with the BIGS2 recipe."""
    return ["torch", "--module", MODULE, "--kwargs", json.dumps(kwargs), "--model-spec", str(SPEC),
            "--roi", json.dumps(ROI), "--postprocess", json.dumps(POSTPROCESS), "--name", name, "--out", str(out),
            "--state-dict", *map(str, state_dicts)]


def random_state_dicts(folder: Path, *, seed: int = 0, folds: int = 5, kwargs: dict = TINY_KWARGS) -> list[Path]:
    """One random-weight SegResNetDS state dict per fold (seed + fold), saved in `folder`."""
    from monai.networks.nets import SegResNetDS

    paths = []
    for fold in range(folds):
        torch.manual_seed(seed + fold)
        paths.append(Path(folder) / f"bigs2_fold{fold}.pt")
        torch.save(SegResNetDS(**kwargs).state_dict(), paths[-1])
    return paths


def make(out: Path, *, seed: int = 0, folds: int = 5, overwrite: bool = False) -> Path:
    """Random-weight SegResNetDS folds exported to `out`; ExportError if the route fails."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = torch_route_argv(random_state_dicts(Path(tmp), seed=seed, folds=folds), out, kwargs=TINY_KWARGS,
                                name="bigs2-random")
        if to_onnx.main(argv + (["--overwrite"] if overwrite else [])) != 0:
            raise ExportError(f"the torch route failed for {out} (its message is above)")
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "weights" / "bigs2-random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    make(args.out, seed=args.seed, folds=args.folds, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
