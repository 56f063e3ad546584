"""A model's input channels on its grid: sampling the native CT/PET (build.py), intensity ops (intensity.py),
spectrum harmonisation (harmonise.py) and click prompts (clicks.py)."""
