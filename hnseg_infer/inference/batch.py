"""The one check of a tile batch against a model's static signature, shared by the engines: the error says what
is wrong in the recipe's terms before onnxruntime or OpenVINO says it in its own."""

from __future__ import annotations

from pathlib import Path

from hnseg_infer.errors import ModelError


def check_batch(path: Path, shape: tuple[int, ...], *, n_input_channels: int | None,
                patch_zyx: tuple[int, int, int] | None) -> None:
    if len(shape) != 5 or shape[0] == 0:
        raise ModelError(f"{path}: given an array of shape {shape}; the model takes a non-empty 5-D "
                         f"[N, C, z, y, x] batch")
    if n_input_channels is not None and shape[1] != n_input_channels:
        raise ModelError(f"{path}: given {shape[1]} channels, the model takes {n_input_channels}: "
                         f"fix the recipe's 'channels'")
    if patch_zyx is not None and tuple(shape[2:]) != patch_zyx:
        raise ModelError(f"{path}: given tiles of {tuple(shape[2:])}, the model is fixed to "
                         f"{patch_zyx}: set the recipe's patch_size_zyx to it")
