"""hnseg: head-and-neck tumour and lymph-node segmentation in FDG PET/CT (HECKTOR 2025 Task 1)."""

__version__ = "0.1.0"
