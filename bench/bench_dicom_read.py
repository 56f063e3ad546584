"""Reading a DICOM CT series: hnseg's reader (io/dicom.py: pydicom headers, slices ordered and checked, then GDCM)
against SimpleITK's series reader (GDCM) on the same files, and against reading the same CT as one .mha.

The CT is a head-and-neck phantom at 512 × 512 × 0.98 mm, 2 mm slices, written as one DICOM file per slice in
shuffled order (test/dicom_series.py). The three readers alternate, repeat by repeat (paired, interleaved), and
hnseg's volume must equal SimpleITK's voxel for voxel and in geometry (checked).

    .venv/bin/python bench/bench_dicom_read.py [--repeats 5] [--work /tmp/hnseg-bench-dicom]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))
from dicom_series import write_ct_series  # noqa: E402

from hnseg_infer.io.dicom import read_series  # noqa: E402
from hnseg_infer.tools.phantom import make_phantom  # noqa: E402


def read_hnseg(folder: Path) -> sitk.Image:
    return read_series(folder, "ct")[0]


def read_simpleitk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hnseg-bench-dicom"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    ct = make_phantom(seed=3, fov="head-neck").ct
    write_ct_series(ct, args.work / "ct")
    sitk.WriteImage(ct, str(args.work / "ct.mha"))
    print(f"CT {ct.GetSize()} at {np.round(ct.GetSpacing(), 2).tolist()} mm: {ct.GetSize()[2]} DICOM files")

    ours, theirs = read_hnseg(args.work / "ct"), read_simpleitk(args.work / "ct")
    assert np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(theirs).astype(np.int16))
    for a, b in ((ours.GetOrigin(), theirs.GetOrigin()), (ours.GetSpacing(), theirs.GetSpacing()),
                 (ours.GetDirection(), theirs.GetDirection())):
        np.testing.assert_allclose(a, b, atol=1e-4)
    print("hnseg's volume equals SimpleITK's (voxels, origin, spacing, direction)")

    readers = {"hnseg (checked)": lambda: read_hnseg(args.work / "ct"),
               "SimpleITK series": lambda: read_simpleitk(args.work / "ct"),
               ".mha": lambda: sitk.ReadImage(str(args.work / "ct.mha"))}
    seconds = {name: [] for name in readers}
    for _ in range(args.repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            read()
            seconds[name].append(time.perf_counter() - start)
    base = np.median(seconds["SimpleITK series"])
    for name, values in seconds.items():
        print(f"{name:18s} median {np.median(values):6.2f} s  ({np.median(values) / base:.2f}x SimpleITK's series "
              f"reader; {args.repeats} repeats)")


if __name__ == "__main__":
    main()
