"""Reading and validating the input images (images.py), atomic writing of every output file (atomic.py), and the
crop-provenance sidecar (sidecar.py): the edges of the pipeline."""
