"""From model grids back to the CT: ensembling and decoding (ensemble.py), the restore strategies (to_ct.py),
SNU's nearest-neighbour paste-back (paste_back.py) and label post-processing (postprocess.py)."""
