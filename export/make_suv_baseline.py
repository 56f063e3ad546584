"""Write a non-learned baseline weights folder (GTVp where SUV > 2.5 inside the head-and-neck box).

It exercises the whole container path (ROI, sampling, normalisation, sliding window, restore, post-processing)
with a one-operator ONNX model; the real-case tests use it. It is not a segmentation model: it cannot tell tumour
from brain or nodes from tumour.

    .venv/bin/python export/make_suv_baseline.py --out DIR
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SUV_THRESHOLD = 2.5


def threshold_model() -> onnx.ModelProto:
    """logits = W·[ct, pet_suv] + b as a 1×1×1 Conv: background 0, GTVp 4·(SUV − 2.5), GTVn −100."""
    weight = np.array([[0, 0], [0, 4.0], [0, 0]], np.float32).reshape(3, 2, 1, 1, 1)
    bias = np.array([0, -4.0 * SUV_THRESHOLD, -100.0], np.float32)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, "z", "y", "x"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, "z", "y", "x"])
    graph = helper.make_graph([helper.make_node("Conv", ["input", "W", "B"], ["logits"])], "suv_threshold", [x], [y],
                              [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)  # onnx 1.23 writes IR 14; the image's onnxruntime 1.22 reads <= 10
    onnx.checker.check_model(model)
    return model


RECIPE = {
    "schema_version": 1,
    "name": "suv-threshold",
    "description": f"Non-learned baseline: GTVp where SUV > {SUV_THRESHOLD} in the PET-threshold head-and-neck box.",
    "roi": {"method": "pet_threshold_head_neck_box", "params": {}},
    "models": [{
        "name": "suv_threshold", "files": ["suv_threshold.onnx"], "spacing_xyz_mm": [2.0, 2.0, 2.0],
        "orientation": "lps", "patch_size_zyx": [96, 96, 96],
        "channels": [{"source": "ct", "ops": [{"op": "window", "min": -1000, "max": 1000, "to": [-1, 1]}]},
                     {"source": "pet", "ops": [{"op": "suv"}]}],
        "head": {"type": "softmax", "labels": [0, 1, 2]}, "fold_average": "probabilities",
        "step_fraction": 0.5, "mirror_axes_zyx": [], "tile_batch": 2, "gaussian": True,
    }],
    "postprocess": {"min_volume_mm3": {"GTVp": 500}, "keep_largest_gtvp": False},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(threshold_model(), str(out / "suv_threshold.onnx"))
    (out / "recipe.json").write_text(json.dumps(RECIPE, indent=2) + "\n")
    print(f"wrote {out}/recipe.json and suv_threshold.onnx")


if __name__ == "__main__":
    main()
