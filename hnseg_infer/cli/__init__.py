"""The command line (`hnseg ...`, main.py) and the grand-challenge entry (process.py → main.container_main): thin
adapters over the Segmenter."""
