"""End-to-end masks of the two CPU backends on the committed-mask cases (test/test_same_masks.py: the demo cascade
with mirroring off and tiles without overlap on six phantoms, the SUV baseline on two): per case the voxels that
differ between the OpenVINO and onnxruntime masks, and each against the committed mask, over the voxels either
labels; and whether every stage's ROI box is the same.

    .venv/bin/python bench/openvino_masks.py [--full-demo] [--cases demo-no_head_bqml ...]
    (--full-demo: the demo recipe as shipped)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "test")]
from test_same_masks import CASES, GOLDEN, differing, fast_demo_weights, suv_baseline_weights, write_phantom  # noqa

from hnseg_infer.segmenter import Segmenter  # noqa: E402

BACKENDS = ("onnxruntime", "openvino")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-demo", action="store_true", help="the demo recipe as shipped (mirroring, overlap)")
    parser.add_argument("--cases", nargs="*", default=None, help="only these WEIGHTS-PHANTOM cases (default all)")
    args = parser.parse_args()
    cases = [c for c in CASES if args.cases is None or f"{c[0]}-{c[1]}" in args.cases]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {"demo": ROOT / "weights" / "demo" if args.full_demo else fast_demo_weights(tmp / "demo"),
                   "suv_baseline": suv_baseline_weights(tmp / "suv")}
        segmenters = {(w, b): Segmenter.from_weights(folder, device="cpu", backend=b)
                      for w, folder in folders.items() for b in BACKENDS}
        total = {"differ": 0, "labelled": 0}
        for weights_name, phantom in cases:
            ct, pet = write_phantom(phantom, tmp / "cases")
            masks, boxes, seconds = {}, {}, {}
            for backend in BACKENDS:
                start = time.perf_counter()
                prediction = segmenters[(weights_name, backend)].predict(ct, pet)
                seconds[backend] = time.perf_counter() - start
                masks[backend] = prediction.mask
                boxes[backend] = [r.roi.box for r in prediction.rois]
            n_differ, n_labelled = differing(masks["openvino"], masks["onnxruntime"])
            total["differ"] += n_differ
            total["labelled"] += n_labelled
            line = f"{weights_name}-{phantom}: openvino vs onnxruntime {n_differ} of {n_labelled} differ"
            if not args.full_demo:
                golden = sitk.ReadImage(str(GOLDEN / f"{weights_name}-{phantom}.mha"))
                for backend in BACKENDS:
                    d, n = differing(masks[backend], golden)
                    line += f"; {backend} vs committed {d} of {n}"
            line += (f"; ROI boxes {'equal' if boxes['openvino'] == boxes['onnxruntime'] else 'DIFFER'}"
                     f"; {seconds['onnxruntime']:.1f} s / {seconds['openvino']:.1f} s")
            print(line, flush=True)
        print(f"total: {total['differ']} of {total['labelled']} labelled voxels differ "
              f"(agreement {1 - total['differ'] / max(1, total['labelled']):.5f})")


if __name__ == "__main__":
    main()
