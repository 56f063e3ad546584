"""Export trained models (nnU-Net v2, MONAI, any PyTorch module) to ONNX weights folders that hnseg_infer runs.

Needs PyTorch (the `export` extra); inference does not. Every route ends in `onnx_export.export_folds`, which
proves each ONNX file equal to its PyTorch original before the weights folder is written.
"""
