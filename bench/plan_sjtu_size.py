"""`hnseg plan` on an SJTU-size fine ensemble (random weights: only the graph's shapes matter for counting):
a ResEnc-L-like nnU-Net (6 stages, features 32…320, residual blocks 1,3,4,6,6,6, 4 input channels, 3 outputs) and
MONAI's SegResNetDS (Auto3DSeg's blocks 1,2,2,4,4), 5 folds each, mirroring on every axis, in a 144 mm cube at 1 mm.
The patch size is not published; 128³ is assumed for both (nnU-Net tiles a 144³ grid with 2 tiles per axis).

    .venv/bin/python bench/plan_sjtu_size.py --ct CT.mha --pet PET.mha [--work /tmp/hnseg-sjtu-size]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hnseg_infer.tools.plan import plan_text, plan_weights  # noqa: E402

PATCH = [128, 128, 128]
CHANNELS = [{"source": "ct", "ops": [{"op": "window", "min": -1000, "max": 1000, "to": [-1, 1]}]}] * 3 + [
    {"source": "pet", "ops": [{"op": "suv"}]}]


def export(network, path: Path) -> None:
    import torch

    network.eval()
    with torch.no_grad():
        torch.onnx.export(network, torch.zeros(1, 4, 64, 64, 64), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input": {0: "N", 2: "z", 3: "y", 4: "x"},
                                        "logits": {0: "N", 2: "z", 3: "y", 4: "x"}})


def networks():
    import torch
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from monai.networks.nets import SegResNetDS

    torch.manual_seed(0)
    resenc = ResidualEncoderUNet(
        input_channels=4, n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=torch.nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, n_blocks_per_stage=[1, 3, 4, 6, 6, 6],
        num_classes=3, n_conv_per_stage_decoder=[1] * 5, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False)
    segresnet = SegResNetDS(init_filters=32, in_channels=4, out_channels=3, blocks_down=(1, 2, 2, 4, 4), dsdepth=1)
    return {"resenc_l": resenc, "segresnetds": segresnet}


def weights_folder(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    models = []
    for name, network in networks().items():
        export(network, work / f"{name}.onnx")
        files = []
        for fold in range(5):  # the same graph five times: FLOPs do not depend on the weights
            link = work / f"{name}_fold{fold}.onnx"
            link.unlink(missing_ok=True)
            link.symlink_to(work / f"{name}.onnx")
            files.append(link.name)
        tiling = {"step_fraction": 0.5} if name == "resenc_l" else {"tiling": "monai", "overlap": 0.625}
        models.append({"name": name, "files": files, "spacing_xyz_mm": [1.0, 1.0, 1.0], "patch_size_zyx": PATCH,
                       "channels": CHANNELS, "head": {"type": "softmax", "labels": [0, 1, 2]},
                       "mirror_axes_zyx": [0, 1, 2], **tiling})
    recipe = {"schema_version": 1, "name": "sjtu-size", "roi": {"method": "ct_top", "params": {"size_mm": [144.0] * 3}},
              "models": models}
    (work / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, required=True)
    parser.add_argument("--pet", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hnseg-sjtu-size"))
    parser.add_argument("--measure", action="store_true", help="also time one 128³ tile per model on this CPU")
    args = parser.parse_args()
    plans = plan_weights(weights_folder(args.work), ct=args.ct, pet=args.pet, measure=args.measure)
    print(plan_text(plans))
    (args.work / "plan.json").write_text(json.dumps([p.to_dict() for p in plans], indent=1))


if __name__ == "__main__":
    main()
