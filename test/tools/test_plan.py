"""`hnseg plan` (tools/plan.py): FLOPs counted from the ONNX graph against hand counts, and the plan of a recipe on
a case (grid, tiles, passes, T4 bound, time predicted from a measured pass)."""

import json

import numpy as np
import onnx
import pytest
from builders import model_entry, write_weights
from conftest import small_case, write_gc_input
from onnx import TensorProto, helper, numpy_helper
from onnx_models import save_conv_model

from hnseg_infer.cli.main import main
from hnseg_infer.tools.plan import T4_FP16_FLOPS, count_flops, plan_weights


def test_conv_flops_are_two_per_multiply_add(tmp_path):
    path = save_conv_model(tmp_path / "conv.onnx", n_in=2, n_out=3, hidden=4)  # Conv 3³ (pad 1) → Relu → Conv 1³
    voxels = 8 * 10 * 12
    assert count_flops(path, (1, 2, 8, 10, 12)) == 2 * voxels * (4 * 2 * 27 + 3 * 4)
    assert count_flops(path, (2, 2, 8, 10, 12)) == 2 * 2 * voxels * (4 * 2 * 27 + 3 * 4)  # per batch item


def test_conv_transpose_matmul_and_gemm_flops(tmp_path):
    w_up = numpy_helper.from_array(np.ones((4, 2, 2, 2, 2), np.float32), "Wup")  # [C_in 4, C_out 2, 2×2×2]
    w_mm = numpy_helper.from_array(np.ones((12, 5), np.float32), "Wmm")
    shape = numpy_helper.from_array(np.array([-1, 12], np.int64), "shape")
    nodes = [helper.make_node("ConvTranspose", ["input", "Wup"], ["up"], strides=[2, 2, 2]),  # → [1, 2, 6, 4, 2]
             helper.make_node("Reshape", ["up", "shape"], ["rows"]),  # → [8, 12]
             helper.make_node("MatMul", ["rows", "Wmm"], ["mm"]),  # [8, 12] @ [12, 5]
             helper.make_node("Gemm", ["mm", "Wg"], ["out"], transA=1)]  # mm' [5, 8] @ [8, 6]
    w_gemm = numpy_helper.from_array(np.ones((8, 6), np.float32), "Wg")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 3, 2, 1])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "mixed", [x], [y], [w_up, w_mm, w_gemm, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "mixed.onnx"
    onnx.save(model, str(path))
    conv_t = 2 * (4 * 3 * 2 * 1) * (2 * 8)  # every input element feeds C_out × k outputs
    matmul = 2 * 8 * 12 * 5
    gemm = 2 * 5 * 8 * 6
    assert count_flops(path, (1, 4, 3, 2, 1)) == conv_t + matmul + gemm


def test_plan_of_a_recipe_on_a_case(tmp_path):
    ct, pet = small_case()
    case = write_gc_input(tmp_path / "in", ct, pet)
    files = [f"f{i}.onnx" for i in range(2)]
    weights = write_weights(tmp_path / "w", models=[model_entry(files=files, mirror_axes_zyx=[0, 2],
                                                                patch_size_zyx=[8, 8, 8], step_fraction=0.5)])
    (plan,) = plan_weights(weights, ct=case / "images/ct/ct.mha", pet=case / "images/pet/pet.mha")
    assert plan.folds == 2 and plan.flips == 4 and plan.passes == 8
    assert plan.flops_per_tile == 2 * 8 ** 3 * 3 * 2  # the builders' 1×1×1 conv: 3 outputs × 2 channels
    assert plan.flops == plan.flops_per_tile * plan.tiles * 8
    assert plan.tiles == np.prod([int(np.ceil((s - 8) / 4)) + 1 if s > 8 else 1 for s in plan.grid_size_zyx])
    assert plan.seconds_per_tile > 0 and plan.predicted_s == pytest.approx(plan.seconds_per_tile * plan.tiles * 8)
    assert plan.to_dict()["t4_fp16_lower_bound_s"] == round(plan.flops / T4_FP16_FLOPS, 3)


def test_hnseg_plan_prints_the_table_and_writes_json(tmp_path, capsys):
    ct, pet = small_case()
    case = write_gc_input(tmp_path / "in", ct, pet)
    weights = write_weights(tmp_path / "w")
    code = main(["plan", "--weights", str(weights), "--ct", str(case / "images/ct/ct.mha"), "--pet",
                 str(case / "images/pet/pet.mha"), "--no-measure", "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert code == 0 and "| main | pet_threshold |" in out and "T4 lower bound" in out
    (entry,) = json.loads((tmp_path / "plan.json").read_text())
    assert entry["predicted_s_here"] is None and entry["passes"] == 1
    code = main(["plan", "--weights", str(tmp_path / "nowhere"), "--ct", str(case / "images/ct/ct.mha")])
    assert code == 2
