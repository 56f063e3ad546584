"""onnxruntime backend: provider choice and fallbacks, the graph's static shapes, fixed-batch models, and errors
that name the file."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
from onnx_models import save_conv_model, save_rank_model, save_voxelwise_model, voxelwise_reference

from hnseg_infer.errors import ModelError
from hnseg_infer.inference.onnx_engine import CPU, CUDA, TENSORRT, OnnxModel, plan_providers
from hnseg_infer.inference.sliding_window import predict_sliding_window

HAS_CUDA = CUDA in ort.get_available_providers()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {
        "voxelwise": save_voxelwise_model(folder / "voxelwise.onnx", n_in=2, n_out=4),
        "fixed": save_voxelwise_model(folder / "fixed.onnx", n_in=2, n_out=3, batch=1, patch_zyx=(6, 5, 4)),
        "loose_channels": save_conv_model(folder / "loose.onnx", n_in=2, n_out=2, static_channels=False),
        "rank4": save_rank_model(folder / "rank4.onnx", rank=4),
    }


def _batch(n, shape=(6, 5, 4), channels=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, channels, *shape)).astype(np.float32)


def test_cpu_provider_is_used_and_reported(models):
    model = OnnxModel(models["voxelwise"], device="cpu", threads=1)
    assert model.provider == CPU and model.fallbacks == []
    assert CPU in repr(model)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDA")
def test_auto_without_cuda_is_cpu_without_fallbacks(models):
    model = OnnxModel(models["voxelwise"])
    assert model.provider == CPU and model.fallbacks == []


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDA")
def test_cuda_without_cuda_falls_back_to_cpu_and_says_so(models):
    model = OnnxModel(models["voxelwise"], device="cuda")
    assert model.provider == CPU
    assert len(model.fallbacks) == 2
    assert TENSORRT in model.fallbacks[0] and CUDA in model.fallbacks[1]
    assert all("not in this onnxruntime build" in line for line in model.fallbacks)


def test_provider_plans():
    gpu_build = [TENSORRT, CUDA, CPU]
    assert plan_providers("cuda", gpu_build) == ([TENSORRT, CUDA, CPU], [])
    assert plan_providers("auto", gpu_build) == ([TENSORRT, CUDA, CPU], [])
    assert plan_providers("cpu", gpu_build) == ([CPU], [])
    chain, fallbacks = plan_providers("auto", [CUDA, CPU])
    assert chain == [CUDA, CPU] and len(fallbacks) == 1 and TENSORRT in fallbacks[0]
    assert plan_providers("auto", [CPU]) == ([CPU], [])
    with pytest.raises(ModelError, match="unknown device 'gpu'"):
        plan_providers("gpu", [CPU])


def test_static_shapes_are_read_from_the_graph(models):
    dynamic = OnnxModel(models["voxelwise"], device="cpu")
    assert (dynamic.n_input_channels, dynamic.n_outputs, dynamic.fixed_batch, dynamic.patch_zyx) == (2, 4, None, None)
    fixed = OnnxModel(models["fixed"], device="cpu")
    assert (fixed.n_input_channels, fixed.n_outputs, fixed.fixed_batch, fixed.patch_zyx) == (2, 3, 1, (6, 5, 4))
    loose = OnnxModel(models["loose_channels"], device="cpu")
    assert loose.n_input_channels is None and loose.n_outputs == 2


def test_logits_are_float32_and_correct(models):
    batch = _batch(2, shape=(7, 3, 5))
    out = OnnxModel(models["voxelwise"], device="cpu")(batch.astype(np.float64))  # cast on the way in
    assert out.dtype == np.float32 and out.shape == (2, 4, 7, 3, 5)
    for item, logits in zip(batch, out):
        np.testing.assert_allclose(logits, voxelwise_reference(item, n_out=4), atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
def test_fixed_batch_model_runs_any_batch_tile_by_tile(models, n):
    batch = _batch(n, seed=n)
    out = OnnxModel(models["fixed"], device="cpu")(batch)
    assert out.shape == (n, 3, 6, 5, 4)
    for item, logits in zip(batch, out):
        np.testing.assert_allclose(logits, voxelwise_reference(item, n_out=3), atol=1e-5)


def test_fixed_batch_model_under_the_sliding_window(models):
    image = _batch(1, shape=(11, 9, 7))[0]
    out = predict_sliding_window(OnnxModel(models["fixed"], device="cpu"), image, patch_zyx=(6, 5, 4), n_outputs=3,
                                 tile_batch=3, mirror_axes_zyx=(0, 1))
    np.testing.assert_allclose(out, voxelwise_reference(image, n_out=3), atol=1e-5)


def test_missing_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match=r"fold_7\.onnx: model file not found"):
        OnnxModel(tmp_path / "fold_7.onnx", device="cpu")


@pytest.mark.parametrize("content", [os.urandom(2048), b"", b"version https://git-lfs.github.com/spec/v1\n"])
def test_corrupt_file_is_a_model_error(tmp_path, content):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=r"corrupt\.onnx: not a loadable ONNX model"):
        OnnxModel(path, device="cpu")


def test_wrong_input_rank_is_a_model_error(models):
    with pytest.raises(ModelError, match=r"rank4\.onnx: input shape .* must both be 5-D"):
        OnnxModel(models["rank4"], device="cpu")


@pytest.mark.parametrize("shape, message", [
    ((2, 6, 5, 4), "5-D"),
    ((0, 2, 6, 5, 4), "non-empty"),
    ((1, 3, 6, 5, 4), "given 3 channels, the model takes 2"),
    ((1, 2, 6, 5, 5), r"fixed to \(6, 5, 4\)"),
])
def test_wrong_batch_is_a_model_error_naming_the_file(models, shape, message):
    with pytest.raises(ModelError, match=rf"fixed\.onnx: .*{message}"):
        OnnxModel(models["fixed"], device="cpu")(np.zeros(shape, np.float32))


def test_failure_inside_onnxruntime_is_a_model_error(models):
    model = OnnxModel(models["loose_channels"], device="cpu")
    assert model(_batch(1)).shape == (1, 2, 6, 5, 4)
    with pytest.raises(ModelError, match=r"loose\.onnx: onnxruntime failed on a batch of shape \(1, 3, 6, 5, 4\)"):
        model(_batch(1, channels=3))


def test_sliding_window_catches_a_model_with_other_outputs(models):
    model = OnnxModel(models["voxelwise"], device="cpu")  # 4 outputs
    with pytest.raises(ModelError, match=r"returned shape \(1, 4, 6, 5, 4\).*expected \(1, 3, 6, 5, 4\)"):
        predict_sliding_window(model, _batch(1)[0], patch_zyx=(6, 5, 4), n_outputs=3)


def test_invalid_threads_is_a_model_error(models):
    with pytest.raises(ModelError, match="threads"):
        OnnxModel(models["voxelwise"], device="cpu", threads=0)
