"""Off the inference path: synthetic phantoms (phantom.py), HECKTOR metrics (metrics.py) and QC pictures (qc.py)."""
