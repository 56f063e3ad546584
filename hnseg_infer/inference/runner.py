"""One model of a recipe, loaded: its fold sessions (and, on first use, its stochastic twins), and the one code path
that runs them: fold-averaged probabilities on the model grid. The pipeline's stages and the uncertainty passes
both run models through `LoadedModel.probabilities`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hnseg_infer.errors import ModelError
from hnseg_infer.inference.backend import open_model
from hnseg_infer.inference.onnx_engine import OnnxModel
from hnseg_infer.inference.sliding_window import predict_sliding_window
from hnseg_infer.inference.stochastic import StochasticModel
from hnseg_infer.recipe.spec import HeadSpec, ModelSpec


def activate(logits_kzyx: np.ndarray, head: HeadSpec) -> np.ndarray:
    """Logits → probabilities: softmax over the outputs, or an independent sigmoid per region."""
    if head.type == "softmax":
        shifted = np.exp(logits_kzyx - logits_kzyx.max(axis=0, keepdims=True))
        return shifted / shifted.sum(axis=0, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits_kzyx))


def _checked(model: OnnxModel, spec: ModelSpec, *, twin: bool = False) -> OnnxModel:
    """A session whose static channel and output counts agree with the recipe's."""
    if model.n_input_channels not in (None, len(spec.channels)):
        fix = "re-export the stochastic twins with the model" if twin else "fix the recipe's 'channels'"
        raise ModelError(f"{model.path} expects {model.n_input_channels} input channels but recipe model "
                         f"{spec.name!r} declares {len(spec.channels)}: {fix}")
    if model.n_outputs not in (None, spec.head.n_outputs):
        declared = f"{spec.head.n_outputs}" + ("" if twin else f" ({spec.head.type} head)")
        fix = "re-export the stochastic twins with the model" if twin else "fix the recipe's 'head'"
        raise ModelError(f"{model.path} produces {model.n_outputs} outputs but recipe model {spec.name!r} declares "
                         f"{declared}: {fix}")
    return model


@dataclass
class LoadedModel:
    """A recipe model with one engine per fold (onnxruntime or OpenVINO: inference/backend.py), created once."""

    spec: ModelSpec
    device: str
    folds: tuple[OnnxModel, ...]
    _stochastic: tuple[StochasticModel, ...] | None = field(default=None, repr=False)
    backend: str = "auto"
    precision: str = "f32"
    allow_trt_build: bool = False

    @classmethod
    def load(cls, spec: ModelSpec, *, device: str, backend: str = "auto", precision: str = "f32",
             allow_trt_build: bool = False) -> "LoadedModel":
        """One engine per fold file (the recipe's hash: an engine's stamp is checked on it)."""
        model = cls(spec, device, (), backend=backend, precision=precision, allow_trt_build=allow_trt_build)
        model.folds = tuple(_checked(model._open(path, sha256), spec) for path, sha256 in zip(spec.files, spec.sha256))
        return model

    def _open(self, path, sha256, *, stochastic: bool = False):
        spec = self.spec
        return open_model(path, device=self.device, backend=self.backend, sha256=sha256, stochastic=stochastic,
                          patch_zyx=spec.tiling.patch_size_zyx, tile_batch=spec.tiling.tile_batch,
                          precision="f32" if stochastic else self.precision, head=spec.head.type,
                          allow_trt_build=self.allow_trt_build)

    @property
    def fallbacks(self) -> list[str]:
        """The provider fallbacks of the folds' sessions (the twins' are reported when they load)."""
        return [line for model in self.folds for line in model.fallbacks]

    def stochastic(self) -> tuple[StochasticModel, ...]:
        """The folds' stochastic twins (Monte-Carlo dropout), opened on first use and kept."""
        if self._stochastic is None:
            self._stochastic = tuple(
                _checked(self._open(path, digest, stochastic=True), self.spec, twin=True)
                for path, digest in zip(self.spec.stochastic_files, self.spec.stochastic_sha256))
        return self._stochastic

    def probabilities(self, image_czyx: np.ndarray, *, runs=None, mirror: bool = True) -> np.ndarray:
        """float32 [K, z, y, x] probabilities on the model grid: every fold (or the callables `runs`, one per fold)
        over the sliding window, averaged as logits or as probabilities; `mirror` False skips the recipe's
        mirroring (the uncertainty passes draw their own augmentation)."""
        spec = self.spec
        forward = (0, *(a + 1 for a in spec.grid.transpose_forward))
        backward = tuple(int(a) for a in np.argsort(forward))
        image = image_czyx.transpose(forward)  # into the network's axis order, and back after the window
        total = None
        folds = self.folds if runs is None else runs
        for fold in folds:
            logits = predict_sliding_window(fold, image, n_outputs=spec.head.n_outputs,
                                            mirror_axes_zyx=spec.tiling.mirror_axes_zyx if mirror else (),
                                            **spec.tiling.window()).transpose(backward)
            term = logits if spec.fold_average == "logits" else activate(logits, spec.head)
            if total is None:
                total = term
            else:
                total += term
        mean = total / len(folds)
        result = activate(mean, spec.head) if spec.fold_average == "logits" else mean
        return result.astype(np.float32, copy=False)
