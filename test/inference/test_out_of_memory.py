"""Out of GPU memory (onnx_engine.py): the tile batch halves and is retried down to 1, then the model moves to the
CPU provider, each step a named fallback; the result is the same. The GPU is stood in for by an injected session
that raises onnxruntime's own allocation error (RuntimeException, worded as the CUDA provider's BFC arena does)."""

import numpy as np
import pytest
from onnx_models import save_voxelwise_model, voxelwise_reference
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, RuntimeException

from hnseg_infer.errors import ModelError
from hnseg_infer.inference.onnx_engine import CPU, CUDA, OnnxModel, is_out_of_memory
from hnseg_infer.inference.sliding_window import predict_sliding_window

ALLOCATION_ERROR = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv "
                    "node. Name:'/conv1/Conv' Status Message: /onnxruntime_src/onnxruntime/core/framework/"
                    "bfc_arena.cc:376 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, "
                    "onnxruntime::Stream*, bool, onnxruntime::WaitNotificationFn) Failed to allocate memory for "
                    "requested buffer of size 2147483648")


class GpuSession:
    """The real CPU session, pretending to be a CUDA one that runs out of memory above `max_batch` tiles."""

    def __init__(self, session, max_batch: int):
        self.session, self.max_batch, self.batches = session, max_batch, []

    def run(self, outputs, feeds):
        batch = next(iter(feeds.values()))
        self.batches.append(len(batch))
        if len(batch) > self.max_batch:
            raise RuntimeException(ALLOCATION_ERROR)
        return self.session.run(outputs, feeds)


@pytest.fixture
def model(tmp_path):
    model = OnnxModel(save_voxelwise_model(tmp_path / "m.onnx", n_in=2, n_out=3), device="cpu", threads=1)
    model.provider = CUDA  # as if on the GPU
    return model


def _batch(n):
    return np.random.default_rng(0).standard_normal((n, 2, 6, 5, 4)).astype(np.float32)


def test_the_tile_batch_halves_until_it_fits_and_stays_there(model):
    session = model._session = GpuSession(model._session, max_batch=2)
    batch = _batch(8)
    logits = model(batch)
    np.testing.assert_allclose(logits, np.stack([voxelwise_reference(b) for b in batch]), rtol=1e-6, atol=1e-6)
    assert session.batches == [8, 4, 2, 2, 2, 2]
    assert model.run_fallbacks == [f"m.onnx: out of memory on {CUDA} with a tile batch of 8; retrying with 4",
                                   f"m.onnx: out of memory on {CUDA} with a tile batch of 4; retrying with 2"]
    model.run_fallbacks.clear()
    model(batch)  # the next batch starts at the size that fitted
    assert session.batches[6:] == [2, 2, 2, 2] and model.run_fallbacks == []


def test_at_one_tile_the_model_moves_to_the_cpu_provider(model):
    model._session = GpuSession(model._session, max_batch=0)  # not even one tile fits
    image = np.random.default_rng(1).standard_normal((2, 13, 11, 9)).astype(np.float32)
    logits = predict_sliding_window(model, image, patch_zyx=(6, 5, 4), n_outputs=3, tile_batch=4)
    np.testing.assert_allclose(logits, voxelwise_reference(image), rtol=1e-5, atol=1e-5)
    assert model.provider == CPU and not isinstance(model._session, GpuSession)
    assert model.run_fallbacks[-1] == (f"m.onnx: out of memory on {CUDA} with a tile batch of 1; running it on "
                                       f"{CPU} from here")
    assert [line.split(" with a tile batch of ")[1][:1] for line in model.run_fallbacks] == ["4", "2", "1"]


def test_out_of_memory_on_the_cpu_is_a_model_error_naming_the_file(model):
    model.provider = CPU
    model._session = GpuSession(model._session, max_batch=0)
    with pytest.raises(ModelError, match=r"m\.onnx: onnxruntime ran out of memory on CPUExecutionProvider"):
        model(_batch(1))


def test_other_run_errors_are_not_taken_for_memory(model):
    assert is_out_of_memory(RuntimeException(ALLOCATION_ERROR))
    assert is_out_of_memory(RuntimeException("CUDA failure 2: out of memory ; GPU=0"))
    assert not is_out_of_memory(InvalidArgument("Got invalid dimensions for input"))

    class Broken:
        def run(self, outputs, feeds):
            raise RuntimeException("Non-zero status code returned while running Conv node: shape mismatch")

    model._session = Broken()
    with pytest.raises(ModelError, match="failed on a batch"):
        model(_batch(2))
    assert model.run_fallbacks == []


def test_the_segmenter_reports_the_steps_as_fallbacks(tmp_path):
    from builders import write_weights
    from conftest import small_case

    from hnseg_infer.segmenter import Segmenter

    segmenter = Segmenter.from_weights(write_weights(tmp_path / "w"), device="cpu", backend="onnxruntime")
    fold = next(iter(segmenter.models.values())).folds[0]
    fold._session = GpuSession(fold._session, max_batch=1)
    fold.provider = CUDA
    prediction = segmenter.predict(*small_case())
    assert f"model.onnx: out of memory on {CUDA} with a tile batch of 2; retrying with 1" in \
        prediction.report.data["fallbacks"]
    assert fold.run_fallbacks == []  # taken by this case's report, not repeated in the next
