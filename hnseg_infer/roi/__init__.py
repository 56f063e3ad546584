"""Where each stage of a recipe looks: the ROI methods, from the images or from the previous stage's labels
(locate.py)."""
