"""The recipe (recipe.json beside the weights): its typed, frozen form and its strict loading (load.py)."""
