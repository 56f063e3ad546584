"""Physical geometry: voxel grids and boxes in LPS millimetres, and sampling images onto grids (grid.py)."""
