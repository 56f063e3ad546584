"""The recipe (recipe.json beside the weights): its typed, frozen form (spec.py), its strict parsing (parse.py) and
its loading with the files it names (load.py)."""
