"""Add spectrum-swapping CT harmonisation (SSIMH, team BIGS2) to an exported weights folder.

    python export/make_harmonisation_reference.py REFERENCE_CT.mha --weights WEIGHTS_DIR \\
        [--pet REFERENCE_PET.mha] [--radius 3] [--model NAME]

REFERENCE_CT is the reference subject the training CTs were harmonised to. It is cropped by the recipe's ROI
method (on --pet when given; else a box of the method's size at the top of the CT, which is the CT itself when
it was already cropped to the ROI) and sampled on the model's grid, as a case's CT will be. The low-frequency
DCT block (max(u, v) < radius) of each axial slice goes into reference_ct_dct.npz beside the weights, and
{"op": "spectrum_swap", ...} becomes the first op of the model's CT channels. Exit 0 when the updated recipe
validates; otherwise exit 2 with one line naming the cause, the folder as it was.
"""

import argparse
import json
import sys
from pathlib import Path

from hnseg_export.harmonisation import add_reference
from hnseg_infer.errors import HnsegError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference_ct", type=Path, metavar="REFERENCE_CT", help="the reference subject's CT")
    parser.add_argument("--weights", type=Path, required=True, help="the exported weights folder (recipe.json)")
    parser.add_argument("--pet", type=Path, default=None, help="the reference subject's PET, for PET-based ROIs")
    parser.add_argument("--radius", type=int, default=3, help="τ: the block max(u, v) < τ is swapped (default 3)")
    parser.add_argument("--model", default=None, help="the recipe model to harmonise (when several have CT)")
    args = parser.parse_args(argv)
    try:
        record = add_reference(args.weights, args.reference_ct, reference_pet=args.pet, radius=args.radius,
                               model=args.model)
    except HnsegError as error:
        print(f"make_harmonisation_reference: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.weights / record['file']} ({record['grid_size_zyx'][0]} slices of "
          f"{record['grid_size_zyx'][1]}×{record['grid_size_zyx'][2]}, radius {record['radius']}) and added "
          f"spectrum_swap to model {record['model']!r} CT channel(s) {record['channels']}; ROI "
          f"{json.dumps(record['roi']['box']['size_xyz_mm'])} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
