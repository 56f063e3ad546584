"""hnseg: head-and-neck tumour and lymph-node segmentation in FDG PET/CT (HECKTOR 2025 Task 1).

    from hnseg_infer import Segmenter
    seg = Segmenter.from_weights("weights/demo", device="cpu")
    prediction = seg.predict(ct="ct.mha", pet="pet.mha")

The API is imported on first use, so that `hnseg_infer.errors` and the tools stay light to import.
"""

from hnseg_infer._version import __version__

__all__ = ["Segmenter", "Prediction", "UncertaintyOptions", "HnsegError", "InputError", "RecipeError", "ModelError",
           "OutputError", "__version__"]


def __getattr__(name: str):
    if name in ("Segmenter", "Prediction"):
        from hnseg_infer import segmenter

        return getattr(segmenter, name)
    if name == "UncertaintyOptions":
        from hnseg_infer.uncertainty.passes import UncertaintyOptions

        return UncertaintyOptions
    if name in ("HnsegError", "InputError", "RecipeError", "ModelError", "OutputError"):
        from hnseg_infer import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'hnseg_infer' has no attribute {name!r}")
