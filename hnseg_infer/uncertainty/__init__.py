"""Uncertainty maps: the recipe's block (config.py), the stochastic passes (passes.py) and their test-time
augmentations (tta.py)."""
