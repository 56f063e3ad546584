"""`hnseg check-output`: a container run's /output checked against the contract, from outside the container.

do_test_run.sh calls it after `docker run`: the mask is uint8 with labels within {0, 1, 2}, on exactly the CT's
grid (size, spacing, origin and direction, no tolerance), and nothing else lies under /output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_infer.errors import OutputError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.io.images import find_single_image, read_image
from hnseg_infer.labels import LABEL_VALUES

GC_OUTPUT_RELATIVE = Path("images/tumor-lymph-node-segmentation/output.mha")


def _everything_under(folder: Path) -> list[str]:
    """Files, links and empty folders under `folder` (relative, sorted): what a run left there."""
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_dir() or path.is_symlink() or not any(path.iterdir()):
            found.append(path.relative_to(folder).as_posix())
    return found


def check_output(input_dir: Path, output_dir: Path) -> str:
    """OutputError naming the file, the value and the fix when the output breaks the contract; else a one-line
    summary of the mask."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    mask_path = output_dir / GC_OUTPUT_RELATIVE
    extra = [p for p in _everything_under(output_dir) if p != GC_OUTPUT_RELATIVE.as_posix()]
    if extra:
        raise OutputError(f"{output_dir} holds more than {GC_OUTPUT_RELATIVE}: {', '.join(extra[:5])}: grand-challenge "
                          f"takes the mask only; write the extras (report, QC, maps) outside /output")
    if not mask_path.is_file():
        raise OutputError(f"no mask at {mask_path}: the run wrote nothing; see its stderr")
    mask = read_image(mask_path, "output")
    if mask.GetPixelID() != sitk.sitkUInt8:
        raise OutputError(f"{mask_path} is {mask.GetPixelIDTypeAsString()}: the contract is uint8; cast before "
                          f"writing")
    values = sorted(np.unique(sitk.GetArrayViewFromImage(mask)).tolist())
    if not set(values) <= LABEL_VALUES:
        raise OutputError(f"{mask_path} holds the values {values}: the contract allows only 0, 1 (GTVp) and 2 (GTVn)")
    ct_path = find_single_image(input_dir / "images" / "ct", "ct")
    ct_grid = Grid.of(read_image(ct_path, "ct"))
    difference = Grid.of(mask).mismatch(ct_grid, tol=0.0)
    if difference is not None:
        raise OutputError(f"{mask_path} is not on the grid of the CT {ct_path}: {difference}; the mask must have "
                          f"exactly the CT's size, spacing, origin and direction")
    counts = np.bincount(sitk.GetArrayViewFromImage(mask).ravel(), minlength=3)
    size = "×".join(map(str, ct_grid.size_xyz))
    return (f"hnseg check-output: ok: {mask_path} is uint8 on the CT grid ({size}), nothing else under "
            f"{output_dir}; GTVp {counts[1]} voxels, GTVn {counts[2]} voxels")
